"""AppTest of pages/4_Loss_Landscape.py on the tiny workspace."""
from __future__ import annotations


import pytest
import torch
from pagetest import run_page

PAGE = "4_Loss_Landscape.py"


def _page(ws, query=None):
    return run_page(PAGE, ws, query)


def test_renders_curves_and_barriers(tiny_workspace):
    at = _page(tiny_workspace)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    assert set(curves["task"]) == {"alpha", "beta", "gamma"}
    assert sorted(curves["lam"].unique()) == pytest.approx(list(__import__("numpy").linspace(0, 1, 5)))
    # the start is the pretrained model, the end fine-tuned on 'alpha': the ends match the reference (validation)
    ref = tiny_workspace.reference
    ref = ref[(ref.split == "validation") & (ref.metric == "accuracy")]
    at0 = curves[(curves.lam == 0) & (curves.metric == "accuracy")].set_index("task")["value"]
    at1 = curves[(curves.lam == 1) & (curves.metric == "accuracy") & (curves.task == "alpha")]["value"].iloc[0]
    # the default subsample (128 per task, here all 48): compare on the same examples through the evaluator
    ev = tiny_workspace.evaluator
    assert curves["n"].max() == 48
    zs = ev.evaluate(None, split="validation", subsample=128).query("metric == 'accuracy'").set_index("task")["value"]
    assert at0.loc[zs.index].tolist() == pytest.approx(zs.tolist())
    ft = ev.evaluate_delta(tiny_workspace.tvs.task_vector("alpha"), split="validation", subsample=128, tasks=["alpha"])
    assert at1 == pytest.approx(ft.query("metric == 'accuracy'")["value"].iloc[0])
    # both barrier definitions are shown by their shared names, with their formulas
    tables = [d.value for d in at.dataframe]
    assert any({"max-over-path barrier", "midpoint barrier"} <= set(t.columns) for t in tables)
    assert len(at.latex) == 2 and "max" in at.latex[0].value and r"L(\tfrac12)" in at.latex[1].value
    assert at.query_params["ll_start"] == ["pretrained"] or at.query_params["ll_start"] == "pretrained"


def test_slider_change_recomputes_and_query_params_restore(tiny_workspace):
    at = _page(tiny_workspace)
    calls = tiny_workspace.evaluator.calls
    at.slider(key="ll_points").set_value(9).run()
    assert not at.exception
    assert tiny_workspace.extras["landscape_last"]["curves"]["lam"].nunique() == 9
    # the 5-point grid is part of the 9-point one: only the 4 new λ are evaluated
    assert tiny_workspace.evaluator.calls - calls == 4
    at.slider(key="ll_points").set_value(5).run()
    assert tiny_workspace.evaluator.calls - calls == 4  # moving back costs nothing
    # a fresh session opened with the URL's parameters restores the choices
    at2 = _page(tiny_workspace, {"ll_start": "fine-tuned: beta", "ll_end": "fine-tuned: gamma", "ll_points": "3"})
    assert not at2.exception
    assert at2.selectbox(key="ll_start").value == "fine-tuned: beta"
    assert at2.selectbox(key="ll_end").value == "fine-tuned: gamma"
    assert at2.slider(key="ll_points").value == 3
    last = tiny_workspace.extras["landscape_last"]
    assert last["title"] == "fine-tuned: beta → fine-tuned: gamma" and last["curves"]["lam"].nunique() == 3


def test_scaling_path_and_full_split(tiny_workspace):
    at = _page(tiny_workspace)
    at.radio(key="ll_path").set_value("Scaling path θ₀ + α·δ").run()
    at.selectbox(key="ll_delta").set_value("sum of task vectors").run()
    at.toggle(key="ll_full").set_value(True).run()
    assert not at.exception, at.exception
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    assert "alpha" in curves.columns and curves["alpha"].min() == 0.0
    assert curves["n"].max() == 48  # the whole validation split of the toy tasks
    best = next(m.value for m in at.markdown if "Best mean accuracy" in m.value)
    assert "examples per task: alpha 48" in best and "standard error" in best


def test_without_workspace_points_home():
    at = run_page(PAGE)
    assert not at.exception
    assert any("Home" in i.value for i in at.info)


def test_merge_endpoint_from_the_registry(tiny_workspace):
    pytest.importorskip("analysis.merging")
    at = _page(tiny_workspace)
    label = "merge: task_arithmetic (defaults)"
    assert label in at.selectbox(key="ll_end").options
    at.selectbox(key="ll_end").set_value(label).run()
    assert not at.exception, at.exception
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    # λ = 1 is θ0 + α·Σ τ at the method's default α: score it directly
    from analysis.merging import METHODS
    alpha = METHODS["task_arithmetic"].defaults(3)["alpha"]
    direct = tiny_workspace.evaluator.evaluate_delta(tiny_workspace.tvs.sum(), alpha=alpha, split="validation",
                                                     subsample=128)
    end = curves[curves.lam == 1].set_index(["task", "metric"])["value"]
    assert end.loc[("beta", "loss")] == pytest.approx(direct.set_index(["task", "metric"])["value"].loc[("beta", "loss")],
                                                      rel=1e-5)


def test_tsv_c_from_history_gives_one_endpoint_per_task(tiny_workspace):
    """TSV-C returns one compressed delta per task: each becomes its own endpoint."""
    from ui.endpoints import delta_of, endpoint_options
    from analysis.merging import merge
    history = [{"method": "tsv_c", "knobs": {"rank_fraction": 0.5}}]
    opts = endpoint_options(tiny_workspace.tvs, history)
    labels = [k for k in opts if "tsv_c" in k]
    assert len(labels) == len(tiny_workspace.tvs.tasks)
    spec = opts[labels[1]]
    expected = merge(tiny_workspace.tvs, "tsv_c", rank_fraction=0.5).for_task(spec["task"])
    got = delta_of(tiny_workspace, spec)
    assert set(got) == set(expected)
    assert all(torch.allclose(got[k], expected[k].float().cpu()) for k in expected)   # merges live on the device


def test_on_a_cpu_a_new_grid_shows_a_first_estimate_then_the_live_subsample(tiny_workspace, monkeypatch):
    """With the first estimate on (as users run it on a CPU), the run evaluates the new points on
    FIRST_ESTIMATE examples per task, waits for the background evaluation of the live subsample
    and reruns with it: the curves the page ends on are the live subsample's."""
    from ui.refine import FIRST_ESTIMATE
    if not str(tiny_workspace.evaluator.device).startswith("cpu"):
        pytest.skip(f"the first estimate is drawn on a CPU only; this evaluator runs on {tiny_workspace.evaluator.device}")
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    at = _page(tiny_workspace, {"ll_sub": "32", "ll_points": "4"})
    assert not at.exception, at.exception
    memo = tiny_workspace.extras["landscape_points"]
    ns = {key[0][4] for key in memo}                               # path key: (kind, a, b, split, n, tasks)
    assert ns == {FIRST_ESTIMATE, 32}                             # the estimate, then the live subsample
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    assert curves["n"].max() == 32 and curves["lam"].nunique() == 4
    want = tiny_workspace.evaluator.evaluate(None, split="validation", subsample=32).query("metric == 'loss'")
    got = curves[(curves.lam == 0) & (curves.metric == "loss")].set_index("task")["value"]
    assert got.loc[want["task"]].tolist() == pytest.approx(want["value"].tolist())
    assert not at.warning and not any("First estimate" in c.value for c in at.caption)


def test_the_first_estimate_draws_what_its_time_budget_allows_and_the_background_does_the_rest(
        tiny_workspace, monkeypatch):
    """With no time to spare the estimate evaluates the grid's two ends only (a line path's barriers need
    them), and the page still ends on every point of the live subsample, evaluated in the background."""
    from ui.refine import FIRST_ESTIMATE
    if not str(tiny_workspace.evaluator.device).startswith("cpu"):
        pytest.skip(f"the first estimate is drawn on a CPU only; this evaluator runs on {tiny_workspace.evaluator.device}")
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    monkeypatch.setenv("MERGESCOPE_ESTIMATE_BUDGET_S", "0")
    tiny_workspace.extras.pop("landscape_points", None)
    at = _page(tiny_workspace, {"ll_sub": "16", "ll_points": "5", "ll_path": "Scaling path θ₀ + α·δ"})
    assert not at.exception, at.exception
    memo = tiny_workspace.extras["landscape_points"]
    estimated = sorted(key[1] for key in memo if key[0][-2] == FIRST_ESTIMATE)   # path key (..., n, tasks)
    assert estimated == [0.0, 1.5]                                 # the α range's ends (default 0 to 1.5)
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    assert curves["n"].max() == 16 and curves["alpha"].nunique() == 5


def test_spread_order_shows_the_shape_first():
    from analysis.landscape import spread_order
    assert spread_order([], [0.0, 0.25, 0.5, 0.75, 1.0]) == [0.0, 1.0, 0.5, 0.25, 0.75]
    assert spread_order([0.0, 1.0], [0.2, 0.4, 0.6, 0.8]) == [0.4, 0.2, 0.6, 0.8]
    assert spread_order([0.5], []) == []


def test_a_line_path_first_estimate_on_a_new_set_has_its_barriers(tiny_workspace, monkeypatch):
    from ui.refine import FIRST_ESTIMATE
    if not str(tiny_workspace.evaluator.device).startswith("cpu"):
        pytest.skip(f"the first estimate is drawn on a CPU only; this evaluator runs on {tiny_workspace.evaluator.device}")
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    monkeypatch.setenv("MERGESCOPE_ESTIMATE_BUDGET_S", "0")
    tiny_workspace.extras.pop("landscape_points", None)
    at = _page(tiny_workspace, {"ll_sub": "16", "ll_points": "7"})
    assert not at.exception, at.exception
    memo = tiny_workspace.extras["landscape_points"]
    assert sorted(key[1] for key in memo if key[0][-2] == FIRST_ESTIMATE) == [0.0, 1.0]
    assert len(tiny_workspace.extras["landscape_last"]["barriers"])
