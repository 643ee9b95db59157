"""A clean, prompt exit of the app's server on SIGTERM / Ctrl-C.

Streamlit stops its server on SIGTERM and returns from `main`; Python then
finalises. A page still running torch code at that moment lives on a daemon
script thread (ScriptRunner.scriptThread; likewise a demo build's
`mergescope-*` job thread): when it comes back from C++ and asks for the GIL
during finalisation, CPython ends the thread with a forced unwind through
pybind11's frames, and the process dies of SIGABRT ("terminate called
without an active exception", exit status -6, a core dump where they are
enabled) instead of exiting. Measured before this hook: exit status -6 on
every SIGTERM while the home page was reading the demo's task vectors
(benchmarks/server.py).

`install()` registers an atexit hook, in the server only (`streamlit run`,
never under AppTest or pytest): the other exit handlers run (pending cache
writes get their few seconds), the standard streams are flushed, and the
process leaves with `os._exit`, so no daemon thread is ever unwound. It does
so even when no thread looks busy: torch keeps C++ threads of its own (the
intra-op pool, autograd workers) that the interpreter's normal finalisation
and C++ static destructors can still meet ("terminate called", seen on
2026-11-23 in the full test suite from a server that had found no busy
thread and so finalised normally), and every file this app writes is complete before its call
returns (analysis/atomic.py), so skipping finalisation loses nothing.
Background jobs (a demo build) are first asked to stop at their next step
(`ui.jobs.stop_all`) and given JOB_STOP_S; one that is still busy then is
left to `os._exit`, which is safe because a build writes every task and
file all or nothing and resumes from the finished ones.
MERGESCOPE_EXIT_HOOK=0 leaves it out (benchmarks/server.py compares both).
"""
from __future__ import annotations

import atexit
import os
import sys

JOB_STOP_S = 2.0   # of the 5 s a SIGTERM may take: jobs reach their next step or are left to os._exit
_installed = False


def _exit_without_unwinding() -> None:
    atexit.unregister(_exit_without_unwinding)
    from ui import jobs
    for label, stopped, last in jobs.stop_all(JOB_STOP_S):
        print(f"mergescope: background job {label} " + ("stopped at a step boundary" if stopped else
              f"still busy after {JOB_STOP_S:.0f} s, ended with the process") + f" (last step: {last}); "
              "its finished work is kept and resumes next time", file=sys.stderr)
    atexit._run_exitfuncs()          # the handlers registered before this one (cache flush, logging)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1 if hasattr(sys, "last_value") else 0)   # an uncaught error keeps a failing status


def install() -> bool:
    """Register the hook once per process, only under `streamlit run`; True when registered."""
    global _installed
    if _installed or "streamlit.web.bootstrap" not in sys.modules or os.environ.get("MERGESCOPE_EXIT_HOOK") == "0":
        return False
    atexit.register(_exit_without_unwinding)
    _installed = True
    return True
