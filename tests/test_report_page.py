"""AppTest of pages/5_Report.py on the tiny workspace with a merge history."""
from __future__ import annotations


import pytest
from pagetest import run_page

PAGE = "5_Report.py"


def _history(ws):
    """Two configurations scored through the workspace's own evaluator (validation split)."""
    out = []
    for method, knobs, alpha in (("task_arithmetic", {"alpha": 0.3}, 0.3), ("task_arithmetic", {"alpha": 1.0}, 1.0)):
        df = ws.evaluator.evaluate_delta(ws.tvs.sum(), alpha=alpha, split="validation")
        acc = df[df.metric == "accuracy"].set_index("task")["value"].to_dict()
        out.append({"method": method, "knobs": knobs, "split": "validation", "per_task": acc,
                    "mean": sum(acc.values()) / len(acc)})
    return out


def _page(ws, history=None, query=None):
    state = {} if history is None else {"merge_history": history}
    return run_page(PAGE, ws, query, **state)


def _shown(at):
    return next(d.value for d in at.dataframe if "config" in d.value.columns)


def test_renders_history_with_reference_rows(tiny_workspace):
    hist = _history(tiny_workspace)
    at = _page(tiny_workspace, hist)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    table = _shown(at).set_index("config")
    assert list(table.index) == ["zero-shot", "fine-tuned", "#1 task_arithmetic (alpha=0.3)",
                                 "#2 task_arithmetic (alpha=1)"]
    assert table.loc["#1 task_arithmetic (alpha=0.3)", "mean"] == pytest.approx(hist[0]["mean"] * 100, abs=0.06)
    labels = [b.label for b in at.get("download_button")]
    assert "Report (self-contained HTML)" in labels and "Table (CSV, tidy)" in labels


def test_references_are_scored_on_the_rows_own_examples(tiny_workspace):
    """Rows scored on a subsample are drawn beside zero-shot / fine-tuned scored on the same examples
    (as the Merge page does), not beside the full split's table."""
    from analysis.merging.scoring import merged_accuracy, reference_accuracy, reference_on_examples
    ws = tiny_workspace
    acc = merged_accuracy(ws.evaluator, ws.tvs.sum() * 0.3, split="validation", subsample=4)
    hist = [{"method": "task_arithmetic", "knobs": {"alpha": 0.3}, "split": "validation", "subsample": 4,
             "per_task": acc, "mean": sum(acc.values()) / len(acc)}]
    at = _page(ws, hist)
    assert not at.exception, at.exception
    table = _shown(at).set_index("config")
    same = reference_accuracy(reference_on_examples(ws.evaluator, ws.tvs, "validation", 4), "validation")
    full = reference_accuracy(ws.reference, "validation")
    for model, label in (("zero_shot", "zero-shot"), ("fine_tuned", "fine-tuned")):
        for task in same.index:
            assert table.loc[label, task] == pytest.approx(100 * same.loc[task, model], abs=0.06)
    assert not same.equals(full)   # the test would not tell the two apart otherwise


def test_nai_view_and_query_params(tiny_workspace):
    hist = _history(tiny_workspace)
    at = _page(tiny_workspace, hist)
    nai = [o for o in at.radio(key="rp_metric").options if o.startswith("NAI")][0]
    at.radio(key="rp_metric").set_value(nai).run()
    at.radio(key="rp_chart").set_value("radar").run()
    assert not at.exception
    table = _shown(at).set_index("config")
    assert table.loc["fine-tuned", "mean"] == pytest.approx(100.0)
    assert table.loc["zero-shot", "mean"] == pytest.approx(0.0)
    assert at.query_params["rp_chart"] in ("radar", ["radar"])
    # reopening with the URL's parameters restores the view
    at2 = _page(tiny_workspace, hist, {"rp_metric": nai, "rp_chart": "radar"})
    assert at2.radio(key="rp_metric").value == nai and at2.radio(key="rp_chart").value == "radar"


def test_without_history_shows_reference_and_says_so(tiny_workspace):
    at = _page(tiny_workspace)
    assert not at.exception
    assert any("No merge configuration" in i.value for i in at.info)
    assert set(_shown(at)["config"]) == {"zero-shot", "fine-tuned"}


def test_bad_history_is_an_error_message(tiny_workspace):
    at = _page(tiny_workspace, [{"method": "ties", "knobs": {}}])
    assert not at.exception
    assert at.error and "per-task accuracy" in at.error[0].value


def test_merged_model_export_from_the_page_loads_with_transformers(tiny_demo_workspace, tmp_path):
    pytest.importorskip("analysis.merging")
    import torch
    from transformers import AutoModel
    ws = tiny_demo_workspace
    df = ws.evaluator.evaluate_delta(ws.tvs.sum(), alpha=0.3, split="validation")
    acc = df[df.metric == "accuracy"].set_index("task")["value"].to_dict()
    hist = [{"method": "task_arithmetic", "knobs": {"alpha": 0.3}, "split": "validation", "subsample": None,
             "per_task": acc, "mean": sum(acc.values()) / len(acc)}]
    at = _page(ws, hist)
    at.text_input(key="rp_export_dir").input(str(tmp_path / "merged"))
    at.button(key="rp_export").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    model = AutoModel.from_pretrained(tmp_path / "merged")
    sd = model.state_dict()
    total = ws.tvs.sum()                     # CPU, wherever the set's deltas are resident
    for name in ws.tvs.param_names:
        expected = ws.tvs.base_tensor(name).float() + 0.3 * total[name]
        assert torch.allclose(sd[name].float(), expected, atol=1e-5), name
    assert (tmp_path / "merged" / "heads.safetensors").is_file()
