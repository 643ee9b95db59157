"""AppTest of the Report page's "mergekit YAML" export (ui/mergekit.py): a button and the YAML for a
method mergekit has, analysis.mergekit's refusal instead of a button for one it lacks, and what is
missing when the set's models have no path on disk."""
from __future__ import annotations

import pytest
import yaml
from pagetest import run_page

from analysis.merging import merge
from analysis.merging.scoring import merged_accuracy
from ui.endpoints import recipe_label

PAGE = "5_Report.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entry(ws, method: str, **knobs) -> dict:
    """A history row as the Merge page writes it, scored through the workspace's own evaluator."""
    result = merge(ws.tvs, method, **knobs)
    acc = merged_accuracy(ws.evaluator, result, split="validation")
    return {"method": method, "knobs": dict(result.params), "split": "validation", "subsample": None,
            "per_task": acc, "mean": sum(acc.values()) / len(acc)}


def _mergekit_button(at):
    return [b for b in at.get("download_button") if b.label == "mergekit YAML"]


def _yaml_shown(at) -> dict:
    texts = [c.value for c in at.code if c.language == "yaml"]
    assert len(texts) == 1, texts
    return yaml.safe_load(texts[0])


def _warnings(at) -> list[str]:
    return [w.value for w in at.warning]


@pytest.fixture
def disk_workspace(_toy, tiny_checkpoints):
    """The tiny workspace, its set loaded from safetensors files on disk (so every model has a path)."""
    from conftest import CountingEvaluator, ToyBackbone
    from analysis.taskvectors import TaskVectorSet
    from ui.state import Workspace
    base, _, data, heads = _toy
    tvs = TaskVectorSet.from_checkpoints(tiny_checkpoints["base"], tiny_checkpoints["tasks"],
                                         exclude=[r"^classifier\."])
    return Workspace(name="tiny-on-disk", tvs=tvs, evaluator=CountingEvaluator(ToyBackbone(base), data, heads),
                     extras={"heads": heads})


def test_supported_method_gets_a_mergekit_yaml_and_an_unsupported_one_the_refusal(disk_workspace, tiny_checkpoints):
    ws = disk_workspace
    history = [_entry(ws, "tsv_m", rank_fraction=0.5, alpha=1.0), _entry(ws, "task_arithmetic", alpha=0.3)]
    at = run_page(PAGE, ws, merge_history=history)
    assert not at.exception, at.exception
    assert at.selectbox(key="rp_export_config").value == recipe_label("task_arithmetic", {"alpha": 0.3})
    assert len(_mergekit_button(at)) == 1
    cfg = _yaml_shown(at)
    assert cfg["merge_method"] == "task_arithmetic" and cfg["base_model"] == str(tiny_checkpoints["base"])
    assert [m["model"] for m in cfg["models"]] == [str(p) for p in tiny_checkpoints["tasks"].values()]
    assert all(m["parameters"]["weight"] == pytest.approx(0.3) for m in cfg["models"])
    assert cfg["parameters"] == {"normalize": False, "lambda": 1.0} and cfg["dtype"] == "float32"
    # single .safetensors files: mergekit needs model folders, and the page says which paths to edit
    assert any("edit these paths" in w and str(tiny_checkpoints["base"]) in w for w in _warnings(at))

    at.selectbox(key="rp_export_config").set_value(recipe_label("tsv_m", history[0]["knobs"])).run()
    assert not at.exception, at.exception
    assert not _mergekit_button(at)
    refusal = [w for w in _warnings(at) if w.startswith("**mergekit YAML**")]
    assert len(refusal) == 1 and "tsv_m has no mergekit equivalent" in refusal[0], _warnings(at)
    assert not [c for c in at.code if c.language == "yaml"]


def test_a_set_without_paths_on_disk_says_what_is_missing(tiny_workspace):
    ws = tiny_workspace
    at = run_page(PAGE, ws, merge_history=[_entry(ws, "task_arithmetic", alpha=0.3)])
    assert not at.exception, at.exception
    assert not _mergekit_button(at)
    msg = [w for w in _warnings(at) if w.startswith("**mergekit YAML**")]
    assert len(msg) == 1 and "reads every model from disk" in msg[0], _warnings(at)
    assert all(f"'{label}'" in msg[0] for label in ("base", *ws.tvs.tasks))


@pytest.mark.parametrize("method,knobs", [("iso_c", {}), ("epimer", {}), ("fisher", {}), ("regmean", {})])
def test_methods_mergekit_lacks_are_refused_by_name(disk_workspace, method, knobs):
    """The refusal analysis.mergekit gives, for the data-aware and spectral methods alike (no page run)."""
    from analysis.mergekit import MergekitError, export_workspace_yaml
    with pytest.raises(MergekitError, match=f"{method} has no mergekit equivalent"):
        export_workspace_yaml(disk_workspace.tvs, method, knobs)
