"""Long work in a background thread, so the page stays usable and can be left.

A job reports (fraction, message) through a callback; pages poll `job.state()`
(e.g. from an `st.fragment(run_every=...)`). Jobs are process-wide objects held
in `st.cache_resource`, so one build of a cache folder runs once even when
several sessions ask for it.

A job can be cancelled: its next progress report raises `JobCancelled`
inside the job's own thread, so the work unwinds through its own code at a
step boundary (a demo build keeps every finished task and resumes from
them). `stop_all` does that for every live job; the server's exit hook
calls it on SIGTERM (ui/shutdown.py).
"""
from __future__ import annotations

import os
import threading
import time
import traceback
import weakref
from typing import Callable


def lower_priority(nice: int) -> None:
    """Give the calling thread (and the torch worker threads it starts) `nice` more niceness than the
    process's own (its main thread's, whose thread id is the pid; at most 19), where the OS allows a thread
    its own (Linux); elsewhere nothing changes. Relative, so a server started under `nice` keeps its
    background work below its pages (absolute values put the speculation level with them, and made the
    refinement ask for a higher priority than the pages)."""
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + nice))
    except (AttributeError, OSError):
        pass


class JobCancelled(Exception):
    """Raised inside a job's thread at its next progress report after `cancel()`."""


class BackgroundJob:
    def __init__(self, target: Callable[[Callable[[float, str], None]], object], label: str):
        self.label = label
        self.fraction = 0.0
        self.message = "starting…"
        self.result = None
        self.error: BaseException | None = None
        self.details = ""
        self.started = time.time()
        self.finished: float | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        _LIVE.add(self)
        self._thread = threading.Thread(target=self._run, args=(target,), name=f"mergescope-{label}", daemon=True)
        self._thread.start()

    def _report(self, fraction: float, message: str) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"{self.label} was stopped (last step: {self.message})")
        with self._lock:
            self.fraction = max(0.0, min(1.0, float(fraction)))
            self.message = str(message)

    def _run(self, target) -> None:
        try:
            self.result = target(self._report)
        except BaseException as exc:  # shown in the page, never raised into it
            self.error = exc
            self.details = traceback.format_exc()
        finally:
            self.finished = time.time()

    def cancel(self) -> None:
        """Ask the job to stop at its next progress report."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job's thread; True when it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def state(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.message


_LIVE: "weakref.WeakSet[BackgroundJob]" = weakref.WeakSet()


def any_running(label: str) -> bool:
    """Whether a job with this label is running in this process (any session)."""
    return any(job.label == label and job.running for job in list(_LIVE))


def stop_all(timeout: float) -> list[tuple[str, bool, str]]:
    """Cancel every running job and wait up to `timeout` seconds in all:
    [(label, stopped, last message)] for each job that was running."""
    running = [job for job in list(_LIVE) if job.running]
    for job in running:
        job.cancel()
    deadline = time.monotonic() + timeout
    return [(job.label, job.join(max(0.0, deadline - time.monotonic())), job.message) for job in running]
