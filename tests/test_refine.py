"""The session's background refinement: the latest request wins, a stale one stops."""
import threading
import time

from ui.refine import FIRST_ESTIMATE, Refiner, needs_estimate


def _wait(job, timeout=10.0):
    t0 = time.time()
    while job.running and time.time() - t0 < timeout:
        time.sleep(0.01)
    assert not job.running


def _held(result):
    """A refinement that waits for `release`, then records whether it was told to stop and returns `result`."""
    release = threading.Event()
    seen_stop = []

    def slow(stop):
        release.wait(5)
        seen_stop.append(stop())
        return result
    return slow, release, seen_stop


def test_a_new_request_stops_the_old_one_and_only_the_latest_result_is_served():
    refiner = Refiner()
    slow, release, seen_stop = _held("old")
    old = refiner.request("a", slow)
    new = refiner.request("b", lambda stop: "new")
    release.set()
    _wait(old)
    _wait(new)
    assert seen_stop == [True]                 # the old job was told to stop
    assert refiner.done("a") is None           # a stale key is never served
    assert refiner.done("b") == "new"


def test_the_refinement_runs_below_the_page_and_above_the_speculation():
    import pytest
    from threadnice import thread_nice
    from ui.refine import REFINE_NICE
    from ui.speculate import SPECULATION_NICE
    own = thread_nice()              # niceness is relative to the process's own (the suite may run under `nice`)
    if own is None or own + SPECULATION_NICE > 19:
        pytest.skip("per-thread niceness is read from Linux's /proc, with room to lower it")
    job = Refiner().request("k", lambda stop: thread_nice())
    _wait(job)
    assert job.result == own + REFINE_NICE < own + SPECULATION_NICE and thread_nice() == own   # the caller's untouched


def test_the_same_request_reuses_its_job():
    refiner = Refiner()
    calls = []
    job = refiner.request("k", lambda stop: calls.append(1) or 42)
    assert refiner.request("k", lambda stop: calls.append(1) or 42) is job
    _wait(job)
    assert refiner.done("k") == 42 and calls == [1]


def test_estimates_are_for_the_cpu_and_larger_subsamples_only(monkeypatch):
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "1")
    assert needs_estimate("cpu", 64) and needs_estimate("cpu", None)
    assert not needs_estimate("cpu", FIRST_ESTIMATE)
    assert not needs_estimate("cuda:0", 64)
    monkeypatch.setenv("MERGESCOPE_FIRST_ESTIMATE", "0")
    assert not needs_estimate("cpu", 64)


def test_cancel_unless_stops_a_stale_refinement_and_keeps_the_current_one():
    refiner = Refiner()
    slow, release, seen_stop = _held("a")
    job = refiner.request("a", slow)
    refiner.cancel_unless("a")                 # the same key: left running
    assert refiner.is_current("a") and not seen_stop
    refiner.cancel_unless("b")                 # a new estimate is about to be scored: the old one stops
    release.set()
    _wait(job)
    assert seen_stop == [True]
    assert refiner.done("a") is None and not refiner.is_current("a")


def test_cancel_unless_view_keeps_the_view_s_own_refinement_whatever_its_subsample_and_stops_another_s():
    refiner = Refiner()
    slow, release, seen_stop = _held("v")
    job = refiner.request(("set", "tsv_m", "k1", "test", 64), slow)
    refiner.cancel_unless_view(("set", "tsv_m", "k1", "test"))   # the same view (a rerun): left running
    assert refiner.is_current(("set", "tsv_m", "k1", "test", 64)) and not seen_stop
    refiner.cancel_unless_view(("set", "tsv_m", "k2", "test"))   # a move: stopped before the merge
    release.set()
    _wait(job)
    assert seen_stop == [True] and not refiner.is_current(("set", "tsv_m", "k1", "test", 64))
    refiner.cancel_unless_view(("set", "tsv_m", "k2", "test"))   # nothing in flight: nothing to do


def test_another_unit_of_an_estimate_starts_only_if_it_should_end_within_the_budget():
    from ui.refine import another_fits
    assert another_fits(0.0, 0, 0.5) and another_fits(3.0, 0, 0.5)   # the first always runs
    assert not another_fits(0.45, 1, 0.5)      # one more at 0.45 s would end near 0.9 s: past the budget
    assert another_fits(0.2, 1, 0.5)           # ends near 0.4 s
    assert another_fits(0.3, 2, 0.5) and not another_fits(0.36, 2, 0.5)   # mean 0.15 s: 0.45 vs 0.54
    assert not another_fits(0.0001, 1, 0.0)    # no budget: the first only
