"""Merging the knob values next to the one on screen while the user looks at it (CPU).

On the 2-core CPU an exact re-merge is most of a slider move's first view where the merge cannot be read
from a kept one (a TSV-M rank below 1/T: 72 float64 eighs; an Iso-CTS common fraction: top-k eigenpairs and
a polar factor per matrix), and it cannot be made an estimate. But a slider moved with the arrow keys, or a
step at a time, lands next to where it was: so once a page's view is final (its refinement landed), the
session's `Speculator` merges the knob sets one slider step away, most likely first (`neighbours`; after a
jump, such as PageDown's tenth of the range, the same jump again comes first: a sweep), and scores each on
the first estimate's examples, in one background thread. A move onto one of them takes
the finished merge and estimate (`Speculator.take`), or waits for the one in flight if that is the one
asked for; a move anywhere else stops the speculation first, which `analysis.merging.engine.run` honours
before its next parameter group (`MergeStopped`; a stoppable merge runs in groups of at most 32 MiB) and
scoring before every module of a forward, so a jump waits at most one small group's work for it.
A move made before the view it left was final is a sweep too: the user moves on without waiting for refined
numbers, so that view merges the same move again first and starts its own refinement only after it
(`Speculator.idle`, pages/3_Merge.py), where the method's merges take at most AHEAD_MAX_S; a user who stops
there gets the refined numbers one background merge later. A background merge also gives
way to a merge any other session asks for on the same inputs (engine: `MergeInputs.waiting`), waits while
anything else in the server uses the CPU (`others_busy`: a refinement, or the process's CPU time), and runs
at a lower priority (SPECULATION_NICE), so what users ask for wins the CPU. It merges nothing while more
sessions use the server than its CPU has room for (`ui.presence.crowded`: on two cores, any other session
active in the last 30 s): 8 sessions moving sliders together on the 2-core CPU had a median move about
10 % slower with speculation than without it before this rule, and with it the server logged no background
merge at all under that load (benchmarks/sessions.py, docs/results_load.md).

Kept: the results of the latest request only (at most MAX_CANDIDATES merged models, plus the one on screen;
the page skips neighbours it has refined numbers for, since going back to one shows them at once),
and, in the inputs' memo, the last SLOTS_RESIDENT unscaled merges per method (analysis.merging.common), so
the view's own α move stays a multiply while its neighbours are merged. Only for resident sets (a
streaming set's merge re-reads its checkpoints and would hold another model copy per neighbour), only where
a first estimate is drawn (a CPU), and never when MERGESCOPE_SPECULATE=0.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Hashable

from analysis.errors import HyperparameterError
from ui import presence
from ui.jobs import BackgroundJob, JobCancelled, any_running, lower_priority

SPECULATION_NICE = 10   # niceness above the process's (Linux: per thread), so a user's own work wins the CPU
MAX_CANDIDATES = 2   # knob sets merged ahead per view: each is one model copy (the quick demo's: 91 MB)
# A sweep merges the next move before refining the view only where the method's last merge computed on the page
# took at most this long. Quick demo, next press 1 s after each first view, 2-core CPU (docs/results_live.md):
# task arithmetic α (a multiply) first views 1.05 → 0.17 s and TSV-M steps below 1/T (about 1 s a merge)
# 1.70 → 1.46 s (medians, one run each; the last view's refined numbers 5.3 → 4.7 s there, 7.1 s in a later
# run); Iso-CTS jumps (2.5–3.7 s a merge in the server) only 4.38 → 3.85 s, and the last view's refined
# numbers came 8.0 → 12.8 s after its press.
AHEAD_MAX_S = 1.5
COMPUTED_S = 0.02   # a page's merge that took longer was computed, not read from Streamlit's cache


def enabled() -> bool:
    return os.environ.get("MERGESCOPE_SPECULATE", "1") != "0"


def is_slider(hp) -> bool:
    """Whether the Merge page draws this knob as a slider (pages/3_Merge.py: knob_widget): every float, and
    ints with at most 64 values; other ints get a number box."""
    return hp.type == "float" or (hp.type == "int" and hp.high - hp.low <= 64)


def slider_knobs(spec) -> list:
    """The method's knobs the Merge page draws as sliders."""
    return [hp for hp in spec.hyperparameters if is_slider(hp)]


def neighbours(spec, params: dict, previous: dict | None, n_tasks: int, limit: int | None = None,
               key: Callable[[dict], Hashable] | None = None) -> list[dict]:
    """Validated knob sets one slider step from `params`, the likeliest next move first: the knob that moved
    from `previous` (the view before), the same move again where it jumped (more than a step: PageDown or
    PageUp, a click on the track), then one step onwards in the direction it moved, then back; then every
    other slider knob up and down. Values are snapped to the step's grid as the slider's are; a step past the
    declared range is left out, a repeated jump stops at its end.
    `key(knobs)`: what the merge depends on (the method's `merge_key`). A step whose merge is the one on
    screen (an Iso-CTS common fraction that leaves every rank split as it was) needs no speculation, since
    the page serves it from its own caches; the step goes on, up to MAX_SKIP steps, to the first value
    with another merge."""
    knobs = slider_knobs(spec)
    moved = [hp for hp in knobs if previous is not None and hp.name in previous
             and previous[hp.name] != params.get(hp.name)]
    ordered = moved + [hp for hp in knobs if hp not in moved]
    here = key(params) if key is not None else None
    out: list[dict] = []
    for hp in ordered:
        value = params[hp.name]
        forward = 1 if hp not in moved or value >= previous[hp.name] else -1
        found = [_stepped(spec, params, hp, d, n_tasks, key, here) for d in (forward, -forward)]
        if hp in moved and abs(value - previous[hp.name]) > 1.5 * (hp.step or 1):
            found.insert(0, _valid(spec, {**params, hp.name: _repeat(hp, value, value - previous[hp.name], n_tasks)},
                                   n_tasks))
        for candidate in found:
            if candidate is None or candidate[hp.name] == value or (key is not None and key(candidate) == here):
                continue
            if candidate not in out:
                out.append(candidate)
            if limit is not None and len(out) >= limit:
                return out
    return out


MAX_SKIP = 20   # steps a neighbour goes on past values whose merge is the view's own


def _stepped(spec, params: dict, hp, direction: int, n_tasks: int, key, here) -> dict | None:
    """`params` with `hp` one step up (+1) or down (−1), validated; where `key` says that merge is the view's
    own, on to the first value with another (at most MAX_SKIP steps). None past the range, or refused."""
    value = params[hp.name]
    for _ in range(MAX_SKIP if key is not None else 1):
        value = _step(hp, value, direction, n_tasks)
        candidate = _valid(spec, {**params, hp.name: value}, n_tasks) if value is not None else None
        if candidate is None or key is None or key(candidate) != here:
            return candidate
    return None


def _valid(spec, knobs: dict, n_tasks: int) -> dict | None:
    try:
        return spec.validate(knobs, n_tasks)
    except HyperparameterError:
        return None


def _repeat(hp, value, move, n_tasks: int):
    """value moved by `move` again (a jump, such as PageDown's tenth of the range, is likeliest followed by the
    same jump: a sweep), snapped to the step grid from the knob's low end and stopped at the range's ends, as
    the slider stops there."""
    step = hp.step or 1
    new = value + move
    if hp.low is not None:
        new = hp.low + round((new - hp.low) / step) * step
    high = hp.high_for(n_tasks)
    new = max(new, hp.low) if hp.low is not None else new
    new = min(new, high) if high is not None else new
    return int(round(new)) if hp.type == "int" else round(new, 10)


def _step(hp, value, direction: int, n_tasks: int):
    """value one step up (+1) or down (−1), on the step's grid (0.8 − 0.01 is 0.79, not 0.7900000000000001,
    as the slider sends it); None past the declared range."""
    new = value + direction * (hp.step or 1)
    new = int(round(new)) if hp.type == "int" else round(new, 10)
    high = hp.high_for(n_tasks)
    if (hp.low is not None and new < hp.low) or (high is not None and new > high):
        return None
    return new


BUSY_POLL_S = 0.1
BUSY_CPU_FRACTION = 0.25   # the server process's CPU use, as a fraction of one core, above which it is busy


def others_busy(sample_s: float = BUSY_POLL_S) -> bool:
    """Whether other work in this server process (any session's script run, refinement or merge) is using
    the CPU: a running refinement (`ui.refine`, label "refine"), or the process's CPU time over `sample_s`
    of wall time above BUSY_CPU_FRACTION of one core, measured while this thread sleeps (an idle server is
    near 0). 8 sessions moving sliders at once on the 2-core CPU (benchmarks/sessions.py) had p50 / p95 of
    2.67–2.78 / 4.82–4.93 s a move with no speculation, 3.07 / 5.69 s with speculation before this wait.
    It always sleeps `sample_s`: it once returned at once while a refinement ran, so a waiting speculator
    spun on the GIL and a served jump's refinement took 19–29 s instead of about 4 (docs/results_live.md)."""
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(sample_s)
    if any_running("refine"):
        return True
    return (time.process_time() - c0) / max(1e-9, time.monotonic() - t0) > BUSY_CPU_FRACTION


class Speculator:
    """One background job per session working through the latest request's candidates in order.

    `request(jobs, keep)`: jobs is [(key, compute)], compute(stop) -> result polling `stop()`; results of
    earlier requests are dropped unless their key is requested again or is `keep` (the view on screen).
    `take(key)`: the result for `key` (waiting for the job in flight when it is computing that key), else
    None; either way any job in flight for another key is stopped, so the caller's own work (its merge, or
    the served view's refinement) does not share the CPU with it."""

    def __init__(self, session: str | None = None):
        self.session = session                    # its session's ui.presence token
        self._lock = threading.Lock()
        self._results: dict[Hashable, object] = {}
        self._queue: list[tuple[Hashable, Callable]] = []
        self._current: Hashable | None = None     # the key the job is computing now
        self._job: BackgroundJob | None = None
        self._stop = threading.Event()
        self.errors: dict[Hashable, BaseException] = {}

    def request(self, jobs: list[tuple[Hashable, Callable]], keep: Hashable | None = None) -> None:
        with self._lock:
            wanted = {key for key, _ in jobs} | {keep}
            self._results = {k: v for k, v in self._results.items() if k in wanted}
            queue = [(k, c) for k, c in jobs if k not in self._results]
            if self._job is not None and self._job.running and self._current is not None \
                    and self._current in wanted:
                # the key in flight is still wanted: let it finish, queue the rest behind it
                self._queue = [(k, c) for k, c in queue if k != self._current]
                return
            self._stop_locked()
            self._queue = queue
            if queue:
                stop = self._stop = threading.Event()
                self._job = BackgroundJob(lambda report: self._work(stop, report), label="speculate")

    def _work(self, stop: threading.Event, report) -> None:
        lower_priority(SPECULATION_NICE)

        def stopped() -> bool:   # this request overtaken, or the server stopping (ui.jobs.stop_all)
            if not stop.is_set():
                try:
                    report(0.0, "merging neighbouring knob values")
                except JobCancelled:
                    stop.set()
            return stop.is_set()

        while not stop.is_set():
            while not stopped() and others_busy():   # what sessions asked for first (it samples for 0.1 s)
                pass
            crowded = presence.crowded(self.session)
            with self._lock:
                if not self._queue or stop is not self._stop or crowded:
                    self._current = None
                    return
                key, compute = self._queue.pop(0)
                self._current = key
            try:
                result = compute(stopped)
            except Exception as exc:   # stopped, or a knob set the method refuses: nothing to serve
                with self._lock:
                    if not stop.is_set():
                        self.errors[key] = exc
                continue
            with self._lock:
                if stop is self._stop:
                    self._results[key] = result

    def _stop_locked(self) -> None:
        self._stop.set()
        self._queue = []
        self._current = None

    def take(self, key: Hashable):
        with self._lock:
            if key in self._results:
                # what is still in flight merges a neighbour of the view the user left: stop it, so the served
                # view's refinement has the CPU (the next request names the new view's neighbours)
                if self._current is not None and self._current != key:
                    self._stop_locked()
                return self._results[key]
            job = self._job if (self._job is not None and self._job.running and self._current == key) else None
            if job is None:
                self._stop_locked()
                return None
            self._queue = []           # finish `key`, then nothing more until the next request
        job.join()
        with self._lock:
            return self._results.get(key)

    def idle(self) -> bool:
        """Whether no job is in flight (all of the latest request merged, or stopped)."""
        with self._lock:
            return self._job is None or not self._job.running

    def cancel(self) -> None:
        with self._lock:
            self._stop_locked()

    def keys(self) -> list:
        with self._lock:
            return list(self._results)
