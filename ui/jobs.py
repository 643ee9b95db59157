"""Long work in a background thread, so the page stays usable and can be left.

A job reports (fraction, message) through a callback; pages poll `job.state()`
(e.g. from an `st.fragment(run_every=...)`). Jobs are process-wide objects held
in `st.cache_resource`, so one build of a cache folder runs once even when
several sessions ask for it.
"""
from __future__ import annotations

import threading
import time
import traceback
from typing import Callable


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
        self._thread = threading.Thread(target=self._run, args=(target,), name=f"mergescope-{label}", daemon=True)
        self._thread.start()

    def _report(self, fraction: float, message: str) -> None:
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

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def state(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.message
