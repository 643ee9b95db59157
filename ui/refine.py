"""Live scoring on a slow device: a first estimate now, the refined score later.

On a CPU, scoring the merged backbone on every task's live subsample takes
seconds. A page scores a small seeded subset first (the evaluator's subsets
are nested: the first n of one seeded permutation, so the estimate's examples
are among the refined ones), shows it, and at the end of its run asks the session's `Refiner` for the
full live subsample in a background thread and waits for it
(`wait_for_refinement`). The refinement starts only once the estimate is on
screen: started before it, it shared the 2 cores with the estimate's own
scoring (on the quick demo, a task-arithmetic α move's first estimate took
as long as scoring the whole live subsample; benchmarks/first_estimate.py).
A run that needs a new estimate first stops an older refinement
(`Refiner.cancel_unless`, honoured before every module of a forward via
`ScoringStopped`: within milliseconds), so a slider move never waits on, or
competes with, a stale refinement; the Merge page stops it before its merge
already (`Refiner.cancel_unless_view`). The refinement's thread runs at
REFINE_NICE: it starts as the browser draws the estimate, and on a laptop
that serves itself the drawing should win those cores.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Hashable

from ui.jobs import BackgroundJob, lower_priority

FIRST_ESTIMATE = 8   # examples per task scored before the page first draws (CPU only)
REFINE_NICE = 5   # niceness above the process's: below a page's own runs and the browser, above the speculation (10)
REFINE_WAIT_S = 90.0   # the longest a page run waits for its refinement (then it keeps the estimate and says so)


def estimate_budget_s() -> float:
    """Seconds a page's first estimate may spend on work it can split (the Loss Landscape's new points:
    at least one is always evaluated, and another only where `another_fits`); $MERGESCOPE_ESTIMATE_BUDGET_S,
    default 0.5. On the 2-core CPU a quick-demo point takes 0.4–0.5 s (8 tasks × 8 examples), so one new
    point and the page's own overhead put the first view at 1.2–1.4 s, under the issue's 1.5 s
    (docs/results_live.md)."""
    try:
        return max(0.0, float(os.environ.get("MERGESCOPE_ESTIMATE_BUDGET_S", "0.5")))
    except ValueError:
        return 0.5


def another_fits(spent_s: float, done: int, budget_s: float) -> bool:
    """Whether a first estimate starts one more unit of splittable work after `done` units in `spent_s`:
    always the first, then only one expected (at the mean so far) to end within `budget_s`. Starting every
    unit that began inside the budget overshot it by up to a whole unit (quick demo, Loss Landscape, 2-core
    CPU, 2026-12-06: first views of 1.45–1.63 s with that rule; docs/results_live.md)."""
    return done == 0 or spent_s + spent_s / done <= budget_s


def needs_estimate(device, subsample: int | None) -> bool:
    """A first estimate pays off only on a CPU and when the live subsample is larger.

    MERGESCOPE_FIRST_ESTIMATE=0 turns it off (the test suite does, so a page test
    sees the final numbers in one run)."""
    if os.environ.get("MERGESCOPE_FIRST_ESTIMATE", "1") == "0":
        return False
    return str(device).startswith("cpu") and (subsample is None or subsample > FIRST_ESTIMATE)


class Refiner:
    """At most one refinement per session: the latest request wins."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: Hashable | None = None
        self._job: BackgroundJob | None = None
        self._stop = threading.Event()

    def request(self, key: Hashable, compute: Callable[[Callable[[], bool]], object]) -> BackgroundJob:
        """The job computing `compute(stop)` for `key`; a new key stops the previous job.

        `compute` must poll `stop()` and give up (raise) when it returns True."""
        with self._lock:
            if key == self._key and self._job is not None and self._job.error is None:
                return self._job
            self._stop.set()
            stop = self._stop = threading.Event()
            self._key = key
            self._job = BackgroundJob(lambda report: _at_refine_priority(compute, stop.is_set), label="refine")
            return self._job

    def cancel_unless(self, key: Hashable) -> None:
        """Stop the refinement in flight unless it is for `key`: called before a first estimate is scored,
        so a stale refinement does not take the CPU from it (its result would never be served anyway)."""
        self._cancel_unless(lambda current: current == key)

    def cancel_unless_view(self, view: tuple) -> None:
        """Stop the refinement in flight unless its key starts with `view`: called before a page merges, so
        a move's merge does not share the CPU with the refinement of the view it left (a TSV-M jump after a
        1 s look waited on that refinement's scoring, docs/results_live.md)."""
        self._cancel_unless(lambda current: isinstance(current, tuple) and current[:len(view)] == view)

    def _cancel_unless(self, keep: Callable[[Hashable | None], bool]) -> None:
        with self._lock:
            if not keep(self._key):
                self._stop.set()
                self._key, self._job = None, None

    def is_current(self, key: Hashable) -> bool:
        """Whether `key` is the latest request (a stale one is never served)."""
        with self._lock:
            return key == self._key

    def failure(self, key: Hashable) -> BaseException | None:
        """The error of `key`'s job, if it failed (never a stop asked for by a newer request)."""
        with self._lock:
            job = self._job if key == self._key else None
        return None if job is None or job.running else job.error

    def done(self, key: Hashable):
        """The refined result for `key` if it has landed, else None."""
        with self._lock:
            job = self._job if key == self._key else None
        if job is None or job.running or job.error is not None:
            return None
        return job.result


def _at_refine_priority(compute, stop):
    lower_priority(REFINE_NICE)
    return compute(stop)


def wait_for_refinement(refiner: Refiner, key: Hashable, compute: Callable[[Callable[[], bool]], object], slot,
                        on_result: Callable[[object], None], text: str,
                        after: Callable[[], bool] | None = None) -> None:
    """At the end of a page run (the first estimate is on screen), start the session's refinement of
    `key` (`Refiner.request(key, compute)`; one already running for `key` is kept) and poll it; when it
    lands, hand it to `on_result` (which keeps it where the next run finds it) and rerun to show it.
    `after()`: the refinement starts only once it returns True (the Merge page in a sweep first merges the
    next step ahead: ui.speculate), polled as the refinement is, within the same REFINE_WAIT_S.

    A slider move interrupts the wait at the slot's next update (Streamlit stops a
    run at its next element call when a newer run is asked for); the wait gives up
    after REFINE_WAIT_S with a warning, so a run always ends. This was an
    `st.fragment(run_every=1.0)` calling `st.rerun()`: with 8 browser sessions on
    2 cores, that left Merge pages at their widgets' proto defaults (the first
    method, 4 examples) in 2 of 2 runs, never with the refinement off
    (benchmarks/sessions.py, docs/results_load.md). Used by the Merge and Loss Landscape pages."""
    import time

    import streamlit as st
    deadline = time.monotonic() + REFINE_WAIT_S
    while after is not None and not after() and time.monotonic() <= deadline:
        slot.caption(text)      # also where Streamlit stops this run when a newer one is asked for
        time.sleep(0.1)
    refiner.request(key, compute)
    while True:
        result = refiner.done(key)
        if result is not None:
            on_result(result)
            st.rerun()
        failed = refiner.failure(key)
        if failed is not None:
            slot.error(f"Refining failed: {failed}")
            return
        if not refiner.is_current(key):   # a newer request replaced it: nothing will land for this run
            return
        if time.monotonic() > deadline:   # never a run that does not end: the estimate stays, say so
            slot.warning(f"The refined numbers did not arrive within {REFINE_WAIT_S:.0f} s (a busy server); the "
                         "numbers shown are the first estimate. Move a slider or reload to try again.")
            return
        slot.caption(text)
        time.sleep(0.25)
