"""AppTest of pages/3_Merge.py on the tiny workspace (toy backbone, real evaluator)."""
from __future__ import annotations

import pytest

from dataclasses import replace

from pagetest import run_page

from analysis.merging import METHODS

PAGE = "3_Merge.py"


def _page(ws, query=None, history=None):
    state = {} if history is None else {"merge_history": history}
    return run_page(PAGE, ws, query, **state)


def _kept(at) -> list:
    return list(at.session_state["merge_history"]) if "merge_history" in at.session_state else []


def _accuracy_table(at):
    frames = [d.value for d in at.dataframe]
    tables = [f for f in frames if "merged" in getattr(f, "columns", [])]
    if not tables:   # a Styler
        tables = [f.data for f in frames if hasattr(f, "data") and "merged" in f.data.columns]
    assert tables, "no accuracy table on the page"
    return tables[0]


def test_renders_and_slider_changes_the_accuracy_table(tiny_workspace):
    at = _page(tiny_workspace)
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "task_arithmetic"
    before = _accuracy_table(at).copy()
    assert {"zero_shot", "fine_tuned", "merged"} <= set(before.columns)
    # α = 0 is the base model: the merged column must equal zero-shot
    at.slider(key="merge_task_arithmetic_alpha").set_value(0.0).run()
    assert not at.exception, at.exception
    zero = _accuracy_table(at)
    # (the toy validation split has 48 examples, fewer than the subsample of 64: the full split is scored)
    assert (zero["merged"] - zero["zero_shot"]).abs().max() < 1e-9
    at.slider(key="merge_task_arithmetic_alpha").set_value(1.5).run()
    after = _accuracy_table(at)
    assert not after["merged"].equals(zero["merged"])
    # three configurations in quick succession: none was kept on screen, only the last one is pending
    assert _kept(at) == []
    entry, _ = at.session_state["merge_history_pending"]
    assert entry["method"] == "task_arithmetic" and entry["knobs"] == {"alpha": 1.5}
    assert entry["split"] == "validation" and entry["subsample"] == 64
    assert set(entry["per_task"]) == set(tiny_workspace.tvs.tasks)
    assert abs(entry["mean"] - sum(entry["per_task"].values()) / 3) < 1e-12


def test_query_params_round_trip(tiny_workspace):
    at = _page(tiny_workspace, {"method": "tsv_m", "rank_fraction": "0.25", "alpha": "0.7"})
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "tsv_m"
    assert at.slider(key="merge_tsv_m_rank_fraction").value == 0.25
    assert at.slider(key="merge_tsv_m_alpha").value == 0.7
    assert at.query_params["method"] == ["tsv_m"] or at.query_params["method"] == "tsv_m"
    # moving a slider writes the URL; opening that URL restores the same state
    at.slider(key="merge_tsv_m_alpha").set_value(1.2).run()
    url = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert url["method"] == "tsv_m" and float(url["alpha"]) == 1.2 and float(url["rank_fraction"]) == 0.25
    again = _page(tiny_workspace, url)
    assert not again.exception, again.exception
    assert again.slider(key="merge_tsv_m_alpha").value == 1.2
    assert again.slider(key="merge_tsv_m_rank_fraction").value == 0.25
    # switching method drops the other method's knobs from the URL
    again.selectbox(key="merge_method").set_value("ties").run()
    url = {k: (v[0] if isinstance(v, list) else v) for k, v in again.query_params.items()}
    assert url["method"] == "ties" and "rank_fraction" not in url and "density" in url


def test_bad_url_values_are_reported_not_crashing(tiny_workspace):
    at = _page(tiny_workspace, {"method": "tsv_m", "alpha": "99"})
    assert not at.exception, at.exception
    assert any("alpha" in w.value for w in at.warning)
    at = _page(tiny_workspace, {"method": "slerp"})      # 3 tasks: slerp is not offered
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "task_arithmetic"
    assert "slerp" not in at.selectbox(key="merge_method").options


def test_every_method_renders_with_its_declared_widgets(tiny_workspace):
    at = _page(tiny_workspace)
    for name, method in METHODS.items():
        if method.unavailable(3, has_data=True):
            continue
        at.selectbox(key="merge_method").set_value(name).run()
        assert not at.exception, (name, at.exception)
        keys = {w.key for w in [*at.slider, *at.checkbox, *at.selectbox, *at.number_input]}
        for hp in method.hyperparameters:
            assert f"merge_{name}_{hp.name}" in keys, (name, hp.name)


def test_without_labelled_data_shows_label_free_comparisons(tiny_workspace):
    """No labels and no text: per-block distances to each fine-tuned model, and a history row the Report lists."""
    ws = replace(tiny_workspace, evaluator=None, reference=None, extras={})
    at = _page(ws, {"method": "task_arithmetic"})
    assert not at.exception, at.exception
    assert any("No labelled data" in i.value for i in at.info)
    layers = [d.value for d in at.dataframe if "relative_distance" in getattr(d.value, "columns", [])]
    assert layers and set(layers[0]["task"]) == set(ws.tvs.tasks)
    # task arithmetic at α: δ = α Σ τ; nothing meaningless like ‖δ‖/‖Σ τ‖ = α is shown
    assert not any("merged_norm" in getattr(d.value, "columns", []) for d in at.dataframe)
    hist = at.session_state["merge_history"]
    assert hist[-1]["split"] == "label-free" and set(hist[-1]["label_free"]) == set(ws.tvs.tasks)


def test_history_keeps_one_row_per_recipe_looked_at_and_rows_can_be_removed(tiny_workspace, monkeypatch):
    at = _page(tiny_workspace)
    at.slider(key="merge_task_arithmetic_alpha").set_value(1.5).run()
    at.slider(key="merge_task_arithmetic_alpha").set_value(0.3).run()
    # stepped through in well under DWELL_S: nothing kept, one pending (the one on screen)
    assert _kept(at) == []
    monkeypatch.setattr("ui.history.DWELL_S", 0.0)   # now every configuration counts as looked at
    at.slider(key="merge_task_arithmetic_alpha").set_value(1.5).run()
    at.slider(key="merge_task_arithmetic_alpha").set_value(0.3).run()
    at.slider(key="merge_task_arithmetic_alpha").set_value(1.5).run()
    assert not at.exception, at.exception
    hist = at.session_state["merge_history"]
    assert [h["knobs"]["alpha"] for h in hist] == [0.3, 1.5]       # one row per recipe, in order first kept
    table = [d.value for d in at.dataframe if "mean accuracy (%)" in getattr(d.value, "columns", [])][0]
    assert list(table["#"]) == ["1", "2"]                          # the one on screen is row 2, not a new row
    # remove row 1 through the page's control
    pick = at.multiselect(key="merge_history_remove_pick")
    pick.set_value([pick.options[0]]).run()
    at.button(key="merge_history_remove").click().run()
    assert not at.exception, at.exception
    assert [h["knobs"]["alpha"] for h in at.session_state["merge_history"]] == [1.5]


def _skip_unless_scored_on_a_cpu(ws):
    import pytest
    if not str(ws.evaluator.device).startswith("cpu"):
        pytest.skip(f"the first estimate is drawn on a CPU only; this evaluator runs on {ws.evaluator.device} "
                    "(test_off_the_cpu_the_page_scores_in_full_in_one_run covers that case)")


def test_off_the_cpu_the_page_scores_in_full_in_one_run(tiny_workspace, monkeypatch):
    import pytest

    from analysis.merging import merge
    from analysis.merging.scoring import merged_accuracy
    from ui import refine
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    needs = refine.needs_estimate
    monkeypatch.setattr(refine, "needs_estimate", lambda device, n: needs("cuda:0", n))   # as on a GPU
    ws = tiny_workspace
    at = _page(ws, query={"method": "task_arithmetic", "alpha": "0.5", "subsample": "20"})
    assert not at.exception, at.exception
    refined = at.session_state["merge_refined"] if "merge_refined" in at.session_state else {}
    assert not refined                                       # no background refinement was asked for
    want = merged_accuracy(ws.evaluator, merge(ws.tvs, "task_arithmetic", alpha=0.5), subsample=20)
    assert _accuracy_table(at).loc[list(want), "merged"].tolist() == pytest.approx(list(want.values()))
    assert not any("First estimate" in c.value for c in at.caption) and not at.warning


def test_on_a_cpu_the_run_waits_for_the_refined_score_and_shows_it(tiny_workspace, monkeypatch):
    import pytest

    from analysis.merging import merge
    from analysis.merging.scoring import merged_accuracy
    _skip_unless_scored_on_a_cpu(tiny_workspace)
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    ws = tiny_workspace
    at = _page(ws, query={"method": "task_arithmetic", "alpha": "0.5", "subsample": "20"})
    assert not at.exception, at.exception
    # the run drew the first estimate, waited for the background refinement and reran with it
    key = next(iter(at.session_state["merge_refined"]))
    assert at.session_state["merge_refiner"].is_current(key) and key[-1] == 20
    refined = _accuracy_table(at)
    want = merged_accuracy(ws.evaluator, merge(ws.tvs, "task_arithmetic", alpha=0.5), subsample=20)
    assert refined.loc[list(want), "merged"].tolist() == pytest.approx(list(want.values()))
    assert not any("First estimate" in c.value for c in at.caption) and not at.warning


def test_the_refinement_starts_only_after_the_first_estimate_is_scored(tiny_workspace, monkeypatch):
    """Started before it, the refinement took the CPU from the estimate (benchmarks/first_estimate.py)."""
    from analysis.merging import scoring
    from ui import refine
    _skip_unless_scored_on_a_cpu(tiny_workspace)
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    events = []
    score = scoring.merged_accuracy
    monkeypatch.setattr(scoring, "merged_accuracy",
                        lambda *a, **k: events.append(("score", k.get("subsample", a[3] if len(a) > 3 else None)))
                        or score(*a, **k))
    request = refine.Refiner.request
    monkeypatch.setattr(refine.Refiner, "request",
                        lambda self, key, compute: events.append(("request",)) or request(self, key, compute))
    at = _page(tiny_workspace, query={"method": "task_arithmetic", "alpha": "0.45", "subsample": "20"})
    assert not at.exception, at.exception
    assert ("score", refine.FIRST_ESTIMATE) in events and ("request",) in events and ("score", 20) in events
    assert events.index(("score", refine.FIRST_ESTIMATE)) < events.index(("request",)) < events.index(("score", 20))


def test_refinements_score_the_references_once_per_subsample(tiny_workspace, monkeypatch):
    """Zero-shot and fine-tuned on the live subsample do not depend on the merge: one scoring for every move."""
    import pytest

    from analysis.merging import merge, scoring
    from analysis.merging.scoring import merged_accuracy
    _skip_unless_scored_on_a_cpu(tiny_workspace)
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    calls = []
    ref = scoring.reference_on_examples
    monkeypatch.setattr(scoring, "reference_on_examples",
                        lambda ev, tvs, split, n, stop=None: calls.append(n) or ref(ev, tvs, split, n, stop=stop))
    at = _page(tiny_workspace, query={"method": "task_arithmetic", "alpha": "0.55", "subsample": "24"})
    for alpha in (0.6, 0.65):
        at.slider(key="merge_task_arithmetic_alpha").set_value(alpha).run()
        assert not at.exception, at.exception
    assert calls.count(24) == 1
    want = merged_accuracy(tiny_workspace.evaluator, merge(tiny_workspace.tvs, "task_arithmetic", alpha=0.65),
                           subsample=24)
    assert _accuracy_table(at).loc[list(want), "merged"].tolist() == pytest.approx(list(want.values()))


def test_a_refinement_that_does_not_arrive_in_time_leaves_the_estimate_and_says_so(tiny_workspace, monkeypatch):
    import threading
    import time

    import pytest

    from analysis.merging import merge
    from analysis.merging.scoring import merged_accuracy
    from ui import refine
    _skip_unless_scored_on_a_cpu(tiny_workspace)
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    monkeypatch.setattr(refine, "REFINE_WAIT_S", 1.0)
    gate = threading.Event()   # holds the refinement back until the first run has given up on it
    request = refine.Refiner.request
    monkeypatch.setattr(refine.Refiner, "request",
                        lambda self, key, compute: request(self, key, lambda stop: gate.wait(60) and compute(stop)))
    ws = tiny_workspace
    at = _page(ws, query={"method": "task_arithmetic", "alpha": "0.5", "subsample": "20"})
    assert not at.exception, at.exception
    assert any("did not arrive within 1 s" in w.value for w in at.warning), [w.value for w in at.warning]
    estimate = _accuracy_table(at)
    want_estimate = merged_accuracy(ws.evaluator, merge(ws.tvs, "task_arithmetic", alpha=0.5),
                                    subsample=refine.FIRST_ESTIMATE)
    assert estimate.loc[list(want_estimate), "merged"].tolist() == pytest.approx(list(want_estimate.values()))
    gate.set()
    refiner = at.session_state["merge_refiner"]
    t0 = time.time()
    while refiner._job.running and time.time() - t0 < 60:
        time.sleep(0.05)
    at.run()   # the next run (any widget move) finds the refinement landed and shows it
    assert not at.exception, at.exception
    refined = _accuracy_table(at)
    want = merged_accuracy(ws.evaluator, merge(ws.tvs, "task_arithmetic", alpha=0.5), subsample=20)
    assert refined.loc[list(want), "merged"].tolist() == pytest.approx(list(want.values()))
    assert not at.warning


def test_switching_method_does_not_carry_the_previous_methods_alpha(tiny_workspace):
    at = _page(tiny_workspace)
    assert at.slider(key="merge_task_arithmetic_alpha").value == 0.3
    at.selectbox(key="merge_method").set_value("ties").run()
    assert not at.exception, at.exception
    assert at.slider(key="merge_ties_alpha").value == 1.0
    assert at.query_params.get("alpha") in (["1.0"], "1.0", None), dict(at.query_params)


def test_tsv_m_above_the_rank_cap_says_so_and_gives_the_same_scores(tiny_workspace):
    """T·⌊f·r⌋ > r caps every task at ⌊r/T⌋ triplets: the page says so, and a move between two capped
    fractions is the same merge (one cache key for the merge and its scores)."""
    n_tasks = len(tiny_workspace.tvs.tasks)
    at = _page(tiny_workspace, {"method": "tsv_m", "rank_fraction": "0.9"})
    assert not at.exception, at.exception
    assert any("overflow=cap" in c.value for c in at.caption)
    before = _accuracy_table(at).copy()
    at.slider(key="merge_tsv_m_rank_fraction").set_value(0.95).run()
    assert not at.exception, at.exception
    assert _accuracy_table(at).equals(before)
    at.slider(key="merge_tsv_m_rank_fraction").set_value(round(0.5 / n_tasks, 3)).run()
    assert not any("overflow=cap" in c.value for c in at.caption)
