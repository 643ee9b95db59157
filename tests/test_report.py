"""analysis/report.py: tables with hand-computed answers, exports that really open."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch

from analysis.errors import ValidationError
from analysis.report import (ExportUnavailable, comparison_table, export_status, figure_bytes, history_frame,
                             html_report, set_summary, wide_table, write_hf_model)

HISTORY = [
    {"method": "task_arithmetic", "knobs": {"alpha": 0.3}, "split": "validation",
     "per_task": {"a": 0.80, "b": 0.60}, "mean": 0.70},
    {"method": "tsv_m", "knobs": {"rank_fraction": 0.5, "alpha": 1.0}, "split": "validation",
     "per_task": {"a": 0.90, "b": 0.70}, "mean": 0.80},
]
REFERENCE = pd.DataFrame([
    {"task": "a", "model": "zero_shot", "split": "validation", "metric": "accuracy", "value": 0.50},
    {"task": "b", "model": "zero_shot", "split": "validation", "metric": "accuracy", "value": 0.40},
    {"task": "a", "model": "fine_tuned", "split": "validation", "metric": "accuracy", "value": 1.00},
    {"task": "b", "model": "fine_tuned", "split": "validation", "metric": "accuracy", "value": 0.80},
    {"task": "a", "model": "fine_tuned", "split": "test", "metric": "accuracy", "value": 0.10},  # other split: ignored
])


def test_comparison_table_hand_worked():
    comp = comparison_table(HISTORY, REFERENCE)
    v = comp.set_index(["config", "task", "metric"])["value"]
    ta = "#1 task_arithmetic (alpha=0.3)"
    assert v[(ta, "a", "accuracy")] == pytest.approx(0.80)
    assert v[(ta, "a", "normalized_accuracy")] == pytest.approx(0.80 / 1.00)
    assert v[(ta, "b", "normalized_accuracy")] == pytest.approx(0.60 / 0.80)
    assert v[(ta, "a", "normalized_accuracy_improvement")] == pytest.approx((0.80 - 0.50) / (1.00 - 0.50))
    assert v[(ta, "b", "normalized_accuracy_improvement")] == pytest.approx((0.60 - 0.40) / (0.80 - 0.40))
    # reference rows: fine-tuned normalises to 1 and NAI 1; zero-shot NAI 0
    assert v[("fine-tuned", "a", "normalized_accuracy")] == pytest.approx(1.0)
    assert v[("zero-shot", "b", "normalized_accuracy_improvement")] == pytest.approx(0.0)
    wide = wide_table(comp, "accuracy", tasks=["a", "b"]).set_index("config")
    assert list(wide.index) == ["zero-shot", "fine-tuned", ta, "#2 tsv_m (rank_fraction=0.5, alpha=1)"]
    assert wide.loc[ta, "mean"] == pytest.approx(0.70)
    assert json.loads(wide.loc[ta, "knobs"]) == {"alpha": 0.3}


def test_each_row_is_compared_with_references_on_its_own_examples():
    """A row scored on 4 examples per task is normalised by references on those 4; a full-split row by the
    full-split table; one reference pair per example count, labelled with it."""
    on_four = REFERENCE.assign(value=REFERENCE["value"] / 2)   # different numbers on the subsample
    hist = [{**HISTORY[0], "subsample": 4}, {**HISTORY[1], "subsample": None}]
    comp = comparison_table(hist, {4: on_four, None: REFERENCE})
    v = comp.set_index(["config", "task", "metric"])["value"]
    ta, tsv = "#1 task_arithmetic (alpha=0.3) [subsample 4]", "#2 tsv_m (rank_fraction=0.5, alpha=1)"
    assert v[(ta, "a", "normalized_accuracy")] == pytest.approx(0.80 / 0.50)
    assert v[(ta, "b", "normalized_accuracy_improvement")] == pytest.approx((0.60 - 0.20) / (0.40 - 0.20))
    assert v[(tsv, "a", "normalized_accuracy")] == pytest.approx(0.90 / 1.00)
    assert v[("zero-shot (4 per task)", "a", "accuracy")] == pytest.approx(0.25)
    assert v[("fine-tuned (full split)", "b", "accuracy")] == pytest.approx(0.80)
    assert v[("fine-tuned (4 per task)", "a", "normalized_accuracy")] == pytest.approx(1.0)
    # one count: the plain labels; a count with no table: accuracy only, never another count's references
    one = comparison_table([hist[0]], {4: on_four}).set_index(["config", "task", "metric"])["value"]
    assert one[("zero-shot", "a", "accuracy")] == pytest.approx(0.25)
    none = comparison_table([hist[0]], {None: REFERENCE})
    assert set(none.loc[none["config"] == ta, "metric"]) == {"accuracy"}


def test_history_accepts_tidy_tables_and_rejects_bad_entries():
    tidy = pd.DataFrame({"task": ["a", "b"], "metric": "accuracy", "value": [0.5, 0.25]})
    h = history_frame([{"method": "ties", "knobs": {}, "accuracy": tidy}])
    assert h.set_index("task")["accuracy"].to_dict() == {"a": 0.5, "b": 0.25}
    with pytest.raises(ValidationError, match="per-task accuracy"):
        history_frame([{"method": "ties", "knobs": {}}])
    with pytest.raises(ValidationError, match="no 'method'"):
        history_frame([{"per_task": {"a": 1.0}}])


def test_set_summary_norms_match_direct_computation(tiny_workspace):
    tvs = tiny_workspace.tvs
    calls = []
    tables = set_summary(tvs, progress=lambda f, m: calls.append(f))
    for task in tvs.tasks:
        direct = math.sqrt(sum(float((tvs.delta(task, n).double() ** 2).sum()) for n in tvs.param_names))
        got = tables["tasks"].set_index("task").loc[task, "l2_norm"]
        assert got == pytest.approx(direct, rel=1e-9)
    kinds = tables["kinds"].set_index("kind")
    assert kinds.loc["matrix", "tensors"] == 2 and kinds.loc["vector", "parameters"] == 48
    assert calls[-1] == 1.0 and len(calls) == len(tvs.param_names) + 1


def _figure():
    import plotly.graph_objects as go
    from analysis.plots.report import grouped_bars
    return grouped_bars(comparison_table(HISTORY, REFERENCE), "accuracy", ["a", "b"])


def test_html_report_is_self_contained_with_config():
    from analysis.plots.report import radar
    comp = comparison_table(HISTORY, REFERENCE)
    config = {"history": HISTORY, "split": "validation"}
    page = html_report("test report", {"bars": _figure(), "radar": radar(comp, "accuracy")},
                       {"accuracy": wide_table(comp)}, config)
    assert not re.search(r"<script[^>]*\ssrc=", page)  # plotly.js inline: the page fetches nothing
    assert len(page) > 1_000_000 and page.count("Plotly.newPlot") == 2
    blob = re.search(r"id='mergescope-config-json'>(.*?)</script>", page, re.S).group(1)
    assert json.loads(blob.replace("<\\/", "</")) == json.loads(json.dumps(config))
    assert "#1 task_arithmetic (alpha=0.3)" in page


def test_figure_export_png_and_svg():
    ok, why = export_status()
    if not ok:
        with pytest.raises(ExportUnavailable):
            figure_bytes(_figure(), "png")
        pytest.skip(why)
    fig = _figure()
    png = figure_bytes(fig, "png", width=800, height=500)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    svg = figure_bytes(fig, "svg", width=800, height=500)
    assert b"<svg" in svg[:400]


def test_export_says_so_when_no_browser(monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    ok, why = export_status()
    assert not ok and "Chrome or Chromium" in why
    with pytest.raises(ExportUnavailable, match="Chrome or Chromium"):
        figure_bytes(_figure(), "svg")


def test_merged_model_loads_with_transformers(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel
    from analysis.taskvectors import TaskVectorSet
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    base = BertModel(cfg, add_pooling_layer=False)
    base.save_pretrained(tmp_path / "base")
    sds = {}
    for i, task in enumerate(("x", "y")):
        m = BertModel(cfg, add_pooling_layer=False)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        m.save_pretrained(tmp_path / task)
        sds[task] = tmp_path / task
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", sds)
    merged = tvs.apply(tvs.sum(), alpha=0.5)
    heads = {"x": type("H", (), {"weight": torch.ones(3, 16), "bias": torch.zeros(3), "labels": ("p", "q", "r")})()}
    with pytest.raises(ValidationError, match="base model's folder"):
        write_hf_model(tmp_path / "base" / "merged", merged, tmp_path / "base")
    out = write_hf_model(tmp_path / "merged", merged, tmp_path / "base", heads=heads,
                         metadata={"method": "task_arithmetic", "knobs": {"alpha": 0.5}})
    loaded = AutoModel.from_pretrained(out)
    sd = loaded.state_dict()
    for name in tvs.param_names:
        expected = tvs.base_tensor(name) + 0.5 * (tvs.delta("x", name) + tvs.delta("y", name))
        assert torch.allclose(sd[name], expected, atol=1e-6), name
    from safetensors import safe_open
    with safe_open(str(out / "heads.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x.weight"), torch.ones(3, 16))
        assert json.loads(f.metadata()["labels"]) == {"x": ["p", "q", "r"]}
    assert json.loads((out / "mergescope.json").read_text())["knobs"] == {"alpha": 0.5}
    assert not (tmp_path / "base" / "mergescope.json").exists()  # nothing written into the input folder


def test_export_names_every_missing_piece(monkeypatch):
    """A bare GPU machine has neither kaleido nor a browser: the message says both."""
    import builtins
    real_import = builtins.__import__

    def no_kaleido(name, *args, **kwargs):
        if name == "kaleido":
            raise ImportError("no kaleido here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kaleido)
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    ok, why = export_status()
    assert not ok and "kaleido" in why and "Chrome or Chromium" in why
    monkeypatch.delenv("BROWSER_PATH")
    ok, why = export_status()
    assert not ok and "'kaleido' package" in why
