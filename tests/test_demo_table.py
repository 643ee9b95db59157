"""benchmarks/demo_table.py on the tiny demo: a run killed mid-table resumes from its last finished method."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo_table():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "benchmarks" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_interrupted_table_resumes_from_its_last_finished_method(tiny_demo_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"                       # the tiny build, linked; progress files land beside it
    cache.mkdir()
    for build in tiny_demo_dir.glob("zoo-*"):
        (cache / build.name).symlink_to(build, target_is_directory=True)
    dt = _demo_table()
    out = tmp_path / "table.md"
    argv = ["--cache-dir", str(cache), "--methods", "task_arithmetic,slerp,ties", "--defaults-only",
            "--test-subsample", "16", "--out", str(out)]
    merged, real = [], dt.merge

    def killed_at_ties(inputs, name, **knobs):
        merged.append(name)
        if name == "ties":
            raise KeyboardInterrupt
        return real(inputs, name, **knobs)
    monkeypatch.setattr(dt, "merge", killed_at_ties)
    with pytest.raises(KeyboardInterrupt):
        dt.main(argv)
    assert merged == ["task_arithmetic", "ties"] and not out.exists()
    [progress] = list((cache / "bench").glob("demo_table-*.json"))
    saved = json.loads(progress.read_text())
    assert saved["done"] == ["task_arithmetic", "slerp"]          # slerp: not available on 3 tasks, noted
    assert [r["model"] for r in saved["rows"]] == ["zero-shot (linear probe)", "fine-tuned (own task)",
                                                   "task_arithmetic (defaults)"]

    merged.clear()
    monkeypatch.setattr(dt, "merge", lambda inputs, name, **knobs: merged.append(name) or real(inputs, name, **knobs))
    assert dt.main(argv) == 0
    assert merged == ["ties"]                                       # task_arithmetic read back, not merged again
    text = out.read_text()
    assert "read back from an interrupted run" in text and "`slerp` is not listed" in text
    for row in ("zero-shot (linear probe)", "fine-tuned (own task)", "task_arithmetic (defaults)", "ties (defaults)"):
        assert text.count(f"| {row} |") == 3                        # configurations, absolute, normalised
    assert not progress.exists()                                    # removed once the table is written

    merged.clear()
    assert dt.main(argv) == 0 and merged == ["task_arithmetic", "ties"]   # a finished table starts over
    assert "read back" not in out.read_text()
