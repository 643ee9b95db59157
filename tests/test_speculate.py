"""Merging neighbouring knob values in the background (ui/speculate.py) and what it rests on in the engine:
a merge that stops between parameter groups, one merge at a time per inputs, the last unscaled merges kept."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from analysis.merging import METHODS, MergeInputs, MergeStopped, merge
from analysis.merging.common import SLOTS_RESIDENT
from analysis.taskvectors import TaskVectorSet
from ui import presence, speculate
from ui.speculate import Speculator, neighbours


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """A speculation still merging at interpreter exit aborts it (a torch thread torn down mid-call). Each test
    starts with no other sessions seen (other tests' page runs would count as users of the server)."""
    presence.forget_all()
    yield
    from ui.jobs import stop_all
    stop_all(60.0)


def _set(resident: bool, n_tasks: int = 3, seed: int = 0) -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.zeros(12, 10), "b.weight": torch.zeros(10, 14), "c.weight": torch.zeros(12, 10),
            "a.bias": torch.zeros(12)}
    tasks = {f"t{i}": {k: torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n_tasks)}
    tvs = TaskVectorSet.from_state_dicts(base, tasks)
    if resident:
        tvs.keep_resident("cpu")
    return tvs


# ------------------------------------------------------------------ candidates

def test_neighbours_go_on_in_the_direction_the_knob_moved_then_back_then_the_other_knobs():
    spec = METHODS["iso_cts"]
    params = spec.validate({"common_fraction": 0.8, "alpha": 1.0}, 8)
    down = neighbours(spec, params, {**params, "common_fraction": 0.81}, 8)
    assert [(c["common_fraction"], c["alpha"]) for c in down] == [(0.79, 1.0), (0.81, 1.0), (0.8, 1.05), (0.8, 0.95)]
    up = neighbours(spec, params, {**params, "common_fraction": 0.79}, 8)
    assert [c["common_fraction"] for c in up[:2]] == [0.81, 0.79]
    assert all(c["split"] == "published" for c in down)    # other knobs as they are


def test_neighbours_stay_in_range_snap_to_the_step_and_respect_the_limit():
    spec = METHODS["tsv_m"]
    params = spec.validate({"rank_fraction": 0.125, "alpha": 0.0}, 8)
    got = neighbours(spec, params, None, 8)
    assert {"alpha": -0.05} not in [{"alpha": c["alpha"]} for c in got]          # α ≥ 0
    hp = spec.knob("rank_fraction")
    fractions = sorted(c["rank_fraction"] for c in got if c["rank_fraction"] != 0.125)
    assert fractions == [round(0.125 - hp.step, 10), round(0.125 + hp.step, 10)]
    assert len(neighbours(spec, params, None, 8, limit=2)) == 2
    top = spec.validate({"rank_fraction": 1.0, "alpha": 1.0}, 8)
    assert all(c["rank_fraction"] <= 1.0 for c in neighbours(spec, top, None, 8))


def test_after_a_jump_the_same_jump_comes_first_snapped_and_stopped_at_the_range_end():
    """PageDown moves a tenth of the range: a sweep of them is served by merging the next jump first."""
    spec = METHODS["iso_cts"]
    params = spec.validate({"common_fraction": 0.7, "alpha": 1.0}, 8)
    got = neighbours(spec, params, {**params, "common_fraction": 0.8}, 8)
    assert [c["common_fraction"] for c in got[:3]] == [0.6, 0.69, 0.71]
    up = neighbours(spec, spec.validate({"common_fraction": 0.95, "alpha": 1.0}, 8),
                    {**params, "common_fraction": 0.85}, 8)
    assert [c["common_fraction"] for c in up[:2]] == [1.0, 0.96]       # the slider stops at its end
    tsv = METHODS["tsv_m"]
    low = tsv.knob("rank_fraction").low
    small = tsv.validate({"rank_fraction": 0.025, "alpha": 1.0}, 8)
    got = neighbours(tsv, small, {**small, "rank_fraction": 0.125}, 8)
    assert got[0]["rank_fraction"] == low                               # 0.025 − 0.1 stops at the low end
    at_low = tsv.validate({"rank_fraction": low, "alpha": 1.0}, 8)
    got = neighbours(tsv, at_low, {**at_low, "rank_fraction": 0.025}, 8)
    assert [c["rank_fraction"] for c in got if c["alpha"] == 1.0] == [low + 0.005]   # only back up
    # a step is not a jump: the candidates are as before
    step = neighbours(spec, params, {**params, "common_fraction": 0.71}, 8)
    assert [c["common_fraction"] for c in step[:2]] == [0.69, 0.71]


def test_a_step_that_merges_as_the_view_does_goes_on_to_the_next_merge():
    """Iso-CTS at r = 10, T = 3: c from 0.6 to 0.89 all split 7 + 3·1, 0.59 splits 4 + 3·2 and 0.9 10 + 0.
    From 0.7 the steps with another merge are 0.59 down and 0.9 up (20 steps, MAX_SKIP); the page serves
    0.6 .. 0.89 from its own caches."""
    spec = METHODS["iso_cts"]
    tvs = _set(resident=False)

    def key(k):
        return spec.merge_key(k, tvs)
    params = spec.validate({"common_fraction": 0.7, "alpha": 1.0}, 3)
    got = neighbours(spec, params, {**params, "common_fraction": 0.71}, 3, key=key)
    fractions = [c["common_fraction"] for c in got if c["alpha"] == 1.0]
    assert fractions[:2] == [0.59, 0.9]
    assert all(key(c) != key(params) for c in got)
    assert key(spec.validate({"common_fraction": 0.6}, 3)) == key(spec.validate({"common_fraction": 0.8}, 3))
    assert key(spec.validate({"common_fraction": 0.59}, 3)) != key(params)
    # without `key`, one step each way, as before
    plain = neighbours(spec, params, {**params, "common_fraction": 0.71}, 3)
    assert [c["common_fraction"] for c in plain[:2]] == [0.69, 0.71]


def test_a_method_without_sliders_has_no_neighbours():
    spec = METHODS["weight_averaging"]
    assert neighbours(spec, spec.validate({}, 3), None, 3) == []


# ------------------------------------------------------------------ the speculator

def _wait(pred, timeout=20.0):
    t0 = time.time()
    while not pred() and time.time() - t0 < timeout:
        time.sleep(0.01)
    assert pred()


def _polling(stopped: list):
    """A job that polls its stop until told, then records it in `stopped` and raises MergeStopped."""
    def job(stop):
        while not stop():
            time.sleep(0.005)
        stopped.append(True)
        raise MergeStopped("stopped")
    return job


def test_the_speculator_computes_in_order_and_serves_what_it_computed():
    order = []
    sp = Speculator()
    sp.request([(k, lambda stop, k=k: order.append(k) or f"result {k}") for k in ("a", "b")])
    _wait(lambda: set(sp.keys()) == {"a", "b"})
    assert order == ["a", "b"]
    assert sp.take("a") == "result a" and sp.take("b") == "result b"


def test_taking_a_finished_key_stops_the_job_in_flight_for_another():
    """A served jump: its merge was done, the speculator was merging the next candidate (a neighbour of the
    view the user left). That work is stopped, so the served view's refinement has the CPU."""
    stopped = []
    sp = Speculator()
    sp.request([("done", lambda stop: "result"), ("next", _polling(stopped))])
    _wait(lambda: sp._current == "next")
    assert sp.take("done") == "result"
    _wait(lambda: stopped == [True])
    assert "next" not in sp.keys()


def test_taking_the_key_in_flight_waits_for_it_and_taking_another_stops_it():
    started, release, stopped = threading.Event(), threading.Event(), []

    def slow(stop):
        started.set()
        release.wait(10)
        return "slow"

    sp = Speculator()
    sp.request([("slow", slow), ("later", lambda stop: "later")])
    started.wait(10)
    threading.Timer(0.2, release.set).start()
    assert sp.take("slow") == "slow"                       # waited for the one in flight
    assert "later" not in sp.keys()                        # nothing more is started after a take
    sp.request([("poll", _polling(stopped))])
    _wait(lambda: sp._current == "poll")
    assert sp.take("elsewhere") is None                     # a miss stops the job in flight
    _wait(lambda: stopped == [True])
    assert "poll" not in sp.keys() and "poll" not in sp.errors   # a stop is not an error


def test_a_new_request_keeps_the_results_it_still_wants_and_the_view_on_screen():
    sp = Speculator()
    sp.request([("x", lambda stop: 1), ("y", lambda stop: 2), ("z", lambda stop: 3)])
    _wait(lambda: len(sp.keys()) == 3)
    calls = []
    sp.request([("y", lambda stop: calls.append("y") or 20), ("w", lambda stop: 4)], keep="x")
    _wait(lambda: "w" in sp.keys())
    assert sorted(sp.keys()) == ["w", "x", "y"] and sp.take("y") == 2 and calls == []


def test_a_refused_knob_set_is_recorded_not_served():
    sp = Speculator()
    sp.request([("bad", lambda stop: 1 / 0), ("good", lambda stop: "ok")])
    _wait(lambda: "good" in sp.keys())
    assert isinstance(sp.errors["bad"], ZeroDivisionError) and sp.take("good") == "ok"


# ------------------------------------------------------------------ the engine

def test_a_stopped_merge_raises_and_leaves_the_memo_valid():
    tvs = _set(resident=True)
    inputs = MergeInputs(tvs, persist=False)
    polls = []
    with pytest.raises(MergeStopped):
        merge(inputs, "tsv_m", rank_fraction=0.3, stop=lambda: polls.append(1) or len(polls) > 1)
    assert len(polls) == 2                                     # one group merged, stopped before the next
    finished = merge(inputs, "tsv_m", rank_fraction=0.3)       # completes from the partly filled slot
    fresh = merge(MergeInputs(tvs, persist=False), "tsv_m", rank_fraction=0.3)
    for name in tvs.param_names:
        torch.testing.assert_close(finished[name], fresh[name], rtol=0, atol=0)


def test_one_merge_at_a_time_per_inputs():
    inputs = MergeInputs(_set(resident=True), persist=False)
    others_could_take_it = []

    def sink(name, delta):
        got = []
        t = threading.Thread(target=lambda: got.append(inputs.merge_lock.acquire(blocking=False)))
        t.start()
        t.join()
        if got[0]:
            inputs.merge_lock.release()
        others_could_take_it.append(got[0])

    merge(inputs, "task_arithmetic", sink=sink)
    assert others_could_take_it and not any(others_could_take_it)
    assert inputs.merge_lock.acquire(blocking=False)           # and it is free again afterwards
    inputs.merge_lock.release()


@pytest.mark.parametrize("resident, kept", [(True, SLOTS_RESIDENT), (False, 1)])
def test_a_resident_set_keeps_the_last_unscaled_merges(resident, kept):
    from analysis.merging.iso import split_ranks
    inputs = MergeInputs(_set(resident=resident), persist=False)
    spec = METHODS["iso_cts"]

    def split(c):   # every matrix here has rank 10 (T = 3): c = 0.2, 0.5, 0.6, 1.0 split it 1+3·3, 4+3·2, 7+3·1, 10
        return split_ranks(spec.validate({"common_fraction": c}, 3), inputs.tvs)
    for c in (0.2, 0.5, 0.6, 1.0):
        merge(inputs, "iso_cts", common_fraction=c)
    slots = [k[1][0] for k in inputs.memo if isinstance(k, tuple) and k[0] == "iso_cts"]
    assert slots == [split(c) for c in (1.0, 0.6, 0.5, 0.2)][:kept][::-1]
    if resident:   # an α move at a kept c is a multiply: the slot is read, not recomputed
        before = {k: dict(v) for k, v in inputs.memo.items() if isinstance(k, tuple) and k[0] == "iso_cts"}
        again = merge(inputs, "iso_cts", common_fraction=0.6, alpha=2.0)
        key = next(k for k in before if k[1][0] == split(0.6))
        for name, unscaled in before[key].items():
            assert inputs.memo[key][name] is unscaled
            torch.testing.assert_close(again[name], 2.0 * unscaled)
        assert [k[1][0] for k in inputs.memo if isinstance(k, tuple) and k[0] == "iso_cts"][-1] == split(0.6)
        # 0.7 and 0.8 split rank 10 as 0.6 does (7 + 3·1): the same merge, read from the same slot
        same = merge(inputs, "iso_cts", common_fraction=0.8, alpha=2.0)
        for name in before[key]:
            assert torch.equal(same[name], again[name])
        assert len([k for k in inputs.memo if isinstance(k, tuple) and k[0] == "iso_cts"]) == kept


# ------------------------------------------------------------------ the page

def test_a_step_onto_a_speculated_neighbour_takes_its_merge_and_estimate(tiny_workspace, monkeypatch):
    import analysis.merging as merging
    from analysis.merging.scoring import merged_accuracy
    from pagetest import run_page
    from test_merge_page import _accuracy_table
    from ui import refine
    if not str(tiny_workspace.evaluator.device).startswith("cpu"):
        pytest.skip("speculation runs where a first estimate is drawn: on a CPU")
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    monkeypatch.setenv("MERGESCOPE_SPECULATE", "1")
    assert speculate.enabled()
    ws = tiny_workspace
    ws.tvs.keep_resident("cpu")
    calls = []
    real = merging.merge
    monkeypatch.setattr(merging, "merge", lambda *a, **k: calls.append(
        (threading.current_thread().name, k.get("common_fraction"))) or real(*a, **k))
    at = run_page("3_Merge.py", ws, {"method": "iso_cts", "common_fraction": "0.5", "subsample": "20"})
    assert not at.exception, at.exception
    sp = at.session_state["merge_speculator"]
    _wait(lambda: sp._job is not None and not sp._job.running, timeout=60)
    spec = METHODS["iso_cts"]
    # the first step up with another merge: 0.51 .. 0.56 split ranks 8 and 16 (T = 3) as 0.5 does
    up = neighbours(spec, spec.validate({"common_fraction": 0.5}, 3), None, 3,
                    key=lambda k: spec.merge_key(k, ws.tvs))[0]
    c_up = up["common_fraction"]
    assert c_up == 0.57
    want_key = (ws.key, "iso_cts", spec.merge_key(up, ws.tvs), "validation")
    assert want_key in sp.keys(), sp.keys()
    assert any(name.startswith("mergescope-speculate") and c == c_up for name, c in calls)
    calls.clear()
    at.slider(key="merge_iso_cts_common_fraction").set_value(c_up).run()
    assert not at.exception, at.exception
    assert not any(c == c_up and not name.startswith("mergescope-speculate") for name, c in calls)
    want = merged_accuracy(ws.evaluator, real(ws.tvs, "iso_cts", common_fraction=c_up), subsample=20)
    assert _accuracy_table(at).loc[list(want), "merged"].tolist() == pytest.approx(list(want.values()))
    estimate = sp.take(want_key)[1]
    sp.cancel()                         # the last run asked for c_up's neighbours: stop them before exit
    _wait(lambda: not sp._job.running, timeout=60)
    direct = merged_accuracy(ws.evaluator, real(ws.tvs, "iso_cts", common_fraction=c_up),
                             subsample=refine.FIRST_ESTIMATE)
    assert estimate == pytest.approx(direct)


@pytest.mark.parametrize("left_before_final, quick, ahead", [(True, True, True), (False, True, False),
                                                             (True, False, False)])
def test_in_a_sweep_the_next_move_is_merged_before_the_view_is_refined(tiny_workspace, monkeypatch,
                                                                        left_before_final, quick, ahead):
    """A move made before the view it left had its refined numbers (a sweep) merges the same move again in the
    background first and refines after it, where the method's merges are quick; a move from a final view, or
    a method whose merges are slow, refines first and merges the neighbours after."""
    import analysis.merging as merging
    import analysis.merging.scoring as scoring
    from pagetest import run_page
    if not str(tiny_workspace.evaluator.device).startswith("cpu"):
        pytest.skip("speculation runs where a first estimate is drawn: on a CPU")
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    monkeypatch.setenv("MERGESCOPE_SPECULATE", "1")
    ws = tiny_workspace
    ws.tvs.keep_resident("cpu")
    at = run_page("3_Merge.py", ws, {"method": "iso_cts", "common_fraction": "0.5", "subsample": "20"})
    assert not at.exception, at.exception
    sp = at.session_state["merge_speculator"]
    _wait(sp.idle, timeout=60)
    assert at.session_state["merge_final_view"][1]["common_fraction"] == 0.5
    events = []
    real_merge, real_accuracy = merging.merge, scoring.merged_accuracy

    def recorded_merge(*a, **k):
        out = real_merge(*a, **k)
        events.append(("merged", threading.current_thread().name, k.get("common_fraction")))
        return out

    def recorded_accuracy(*a, **k):
        events.append(("scoring", threading.current_thread().name, a[3] if len(a) > 3 else k.get("subsample")))
        return real_accuracy(*a, **k)
    monkeypatch.setattr(merging, "merge", recorded_merge)
    monkeypatch.setattr(scoring, "merged_accuracy", recorded_accuracy)
    if left_before_final:   # as if the refined numbers of 0.5 had not landed when the slider moved on
        at.session_state["merge_final_view"] = None
    # the method's last merge: quick (0.1 s against any limit) or slow (5 s against none)
    at.session_state["merge_seconds"] = {"iso_cts": 0.1 if quick else 5.0}
    monkeypatch.setattr(speculate, "AHEAD_MAX_S", 1e9 if quick else 0.0)
    at.slider(key="merge_iso_cts_common_fraction").set_value(0.4).run()
    assert not at.exception, at.exception
    assert at.session_state["merge_sweeping"] is False     # the refined numbers landed: the sweep ended
    _wait(sp.idle, timeout=60)
    spec = METHODS["iso_cts"]
    next_c = neighbours(spec, spec.validate({"common_fraction": 0.4}, 3), spec.validate({"common_fraction": 0.5}, 3),
                        3, key=lambda k: spec.merge_key(k, ws.tvs))[0]["common_fraction"]
    assert next_c == 0.3                # the same jump again
    merged_ahead = events.index(("merged", "mergescope-speculate", next_c))
    refined = events.index(("scoring", "mergescope-refine", 20))
    assert (merged_ahead < refined) is ahead, events
    assert ("merged", "mergescope-speculate", 0.4) not in events and len(
        [e for e in events if e[:2] == ("merged", "mergescope-speculate") and e[2] == next_c]) == 1, events
    sp.cancel()
    _wait(sp.idle, timeout=60)


def test_a_stoppable_merge_runs_in_smaller_groups_with_the_same_result(monkeypatch):
    import analysis.merging.engine as engine
    tvs = _set(resident=True)
    plain = merge(MergeInputs(tvs, persist=False), "iso_cts", common_fraction=0.5)
    monkeypatch.setattr(engine, "STOPPABLE_GROUP_BYTES", 4 * 3 * 12 * 10)   # one 12×10 parameter's 3 deltas
    polls = []
    stoppable = merge(MergeInputs(tvs, persist=False), "iso_cts", common_fraction=0.5,
                      stop=lambda: polls.append(1) and False)
    assert len(polls) == 3          # a.weight, c.weight (same shape) and b.weight: one group each
    for name in tvs.param_names:    # float32 products of a batch of one and of two round differently
        err = float((stoppable[name] - plain[name]).norm() / plain[name].norm())
        assert err <= 1e-6, (name, err)


def test_iso_cts_projections_kept_by_a_merge_in_small_groups_serve_one_in_whole_groups(monkeypatch):
    # the projections memo is kept per batch and found per name: whole shape groups after small ones
    # gather their rows, and small groups after whole ones read them; each as a fresh merge of the same
    # grouping would (small and whole groups differ by float32 rounding, up to 3e-5 on this tiny set at c = 0.7)
    import analysis.merging.engine as engine
    tvs = _set(resident=True)
    monkeypatch.setattr(engine, "STOPPABLE_GROUP_BYTES", 4 * 3 * 12 * 10)   # one 12×10 parameter's 3 deltas

    def iso(inputs, c, small):
        return merge(inputs, "iso_cts", common_fraction=c, **({"stop": lambda: False} if small else {}))
    fresh = {(c, small): iso(MergeInputs(tvs, persist=False), c, small) for c in (0.5, 0.7) for small in (0, 1)}
    for first, then in ((1, 0), (0, 1)):
        inputs = MergeInputs(tvs, persist=False)
        for c, small in ((0.5, first), (0.7, then)):
            got = iso(inputs, c, small)
            for name in tvs.param_names:
                torch.testing.assert_close(got[name], fresh[c, small][name], atol=1e-6, rtol=1e-5)
        assert sum(isinstance(k, tuple) and k[0] == "iso_cts_projections" and k[3] == "batch"
                   for k in inputs.memo) == (3 if first else 2)   # per name after small groups, else per shape


def test_a_background_merge_gives_way_to_a_merge_someone_asked_for():
    inputs = MergeInputs(_set(resident=True), persist=False)
    polled, outcome = threading.Event(), []

    def asked():               # nobody asks this merge to stop; it holds on until a user's merge waits
        polled.set()
        t0 = time.time()
        while inputs.waiting() == 0 and time.time() - t0 < 10:
            time.sleep(0.005)
        return False

    def background():
        try:
            merge(inputs, "tsv_m", rank_fraction=0.3, stop=asked)
            outcome.append("finished")
        except MergeStopped:
            outcome.append("stopped")

    th = threading.Thread(target=background)
    th.start()
    assert polled.wait(10)
    wanted = merge(inputs, "tsv_m", rank_fraction=0.2)     # waits for the lock; the background gives way
    th.join(10)
    assert outcome == ["stopped"] and inputs.waiting() == 0
    fresh = merge(MergeInputs(inputs.tvs, persist=False), "tsv_m", rank_fraction=0.2)
    for name in inputs.tvs.param_names:
        torch.testing.assert_close(wanted[name], fresh[name], rtol=0, atol=0)


def test_the_speculating_thread_runs_at_a_lower_priority():
    from threadnice import thread_nice
    if thread_nice() is None:
        pytest.skip("per-thread niceness is read from Linux's /proc")
    own = thread_nice()              # the suite may itself run under `nice`: the niceness is relative to it
    sp = Speculator()
    sp.request([("n", lambda stop: thread_nice())])
    _wait(lambda: "n" in sp.keys())
    assert sp.take("n") == min(19, own + speculate.SPECULATION_NICE)
    assert thread_nice() == own                                  # the caller's own is untouched


def test_each_merge_is_logged_as_requested_or_background(caplog):
    import logging
    inputs = MergeInputs(_set(resident=True), persist=False)
    with caplog.at_level(logging.INFO, logger="analysis.merging.engine"):
        merge(inputs, "iso_cts", common_fraction=0.5)
        merge(inputs, "iso_cts", common_fraction=0.4, stop=lambda: False)
        with pytest.raises(MergeStopped):
            merge(inputs, "iso_cts", common_fraction=0.3, stop=lambda: True)
    lines = [r.getMessage() for r in caplog.records if r.name == "analysis.merging.engine"]
    assert '"common_fraction": 0.5' in lines[0] and lines[0].endswith("(requested)")
    assert '"common_fraction": 0.4' in lines[1] and lines[1].endswith("(background)")
    assert '"common_fraction": 0.3' in lines[2] and "stopped after" in lines[2] and lines[2].endswith("(background)")


def test_the_speculation_waits_while_any_session_refines():
    from ui.jobs import BackgroundJob
    release = threading.Event()
    refining = BackgroundJob(lambda report: release.wait(10), label="refine")   # another session's refinement
    sp = Speculator()
    sp.request([("k", lambda stop: "done")])
    time.sleep(0.5)
    assert "k" not in sp.keys() and sp._job.running          # held back while the refinement runs
    release.set()
    refining.join(10)
    _wait(lambda: "k" in sp.keys())
    assert sp.take("k") == "done"


def test_a_held_back_speculation_still_stops_at_once():
    from ui.jobs import BackgroundJob
    release = threading.Event()
    refining = BackgroundJob(lambda report: release.wait(10), label="refine")
    sp = Speculator()
    sp.request([("k", lambda stop: "done")])
    time.sleep(0.2)
    assert sp.take("elsewhere") is None
    _wait(lambda: not sp._job.running, timeout=2)
    release.set()
    refining.join(10)
    assert "k" not in sp.keys()


def test_other_work_in_the_process_counts_as_busy():
    from ui.speculate import others_busy
    assert any(not others_busy(0.2) for _ in range(10))   # an idle test process (other tests' threads may linger)
    done = threading.Event()

    def spin():
        while not done.is_set():
            sum(range(1000))
    t = threading.Thread(target=spin)
    t.start()
    try:
        assert others_busy(0.2)
    finally:
        done.set()
        t.join()


def test_a_running_refinement_counts_as_busy_and_waiting_on_it_sleeps_instead_of_spinning():
    """A speculator waits in `while others_busy(): pass`: each call must sleep its sample, or the wait holds
    the GIL and starves the refinement it waits for."""
    from ui.jobs import BackgroundJob
    from ui.speculate import others_busy
    release = threading.Event()
    job = BackgroundJob(lambda report: release.wait(10), label="refine")
    try:
        c0, t0 = time.process_time(), time.monotonic()
        assert all(others_busy(0.05) for _ in range(4))
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        assert wall >= 0.2 and cpu < 0.5 * wall
    finally:
        release.set()
        job.join()


# ------------------------------------------------------------------ sessions sharing the server

def test_sessions_count_as_active_while_their_page_ran_recently():
    presence.seen("a", now=100.0)
    presence.seen("b", now=120.0)
    assert presence.active(now=125.0) == {"a", "b"}
    assert presence.active(now=100.0 + presence.ACTIVE_S + 1) == {"b"}     # a is reading, or gone
    assert presence.room(2) == 1 and presence.room(1) == 1 and presence.room(16) == 8
    assert not presence.crowded("a", now=125.0, cpus=4)                   # two sessions, room for two
    assert presence.crowded("a", now=125.0, cpus=2) and presence.crowded(None, now=125.0, cpus=2)
    assert not presence.crowded("b", now=100.0 + presence.ACTIVE_S + 1, cpus=2)   # only b itself


def test_each_session_gets_its_own_token():
    one, two = {}, {}
    assert presence.session_token(one) == presence.session_token(one) != presence.session_token(two)
    assert presence.mark(two) == presence.session_token(two) and presence.active() == {presence.session_token(two)}


def test_the_speculation_merges_nothing_while_other_sessions_use_a_small_server(monkeypatch):
    monkeypatch.setattr(presence, "room", lambda cpus=None: 1)
    presence.seen("mine")
    presence.seen("someone else")
    ran = []
    sp = Speculator(session="mine")
    sp.request([("k", lambda stop: ran.append("k") or "done")])
    _wait(lambda: not sp._job.running, timeout=5)
    assert ran == [] and sp.keys() == [] and sp.take("k") is None
    presence.forget_all()                                   # the other session left
    presence.seen("mine")
    sp.request([("k", lambda stop: ran.append("k") or "done")])
    _wait(lambda: "k" in sp.keys())
    assert ran == ["k"] and sp.take("k") == "done"
