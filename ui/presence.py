"""Which browser sessions of this server are in use, without Streamlit's private session API.

Every page's preamble (`ui.state.start_page`, and Home's) marks its session as seen (`mark`); a session
counts as active while its latest page run is under ACTIVE_S old. Background work that only uses idle CPU
(ui/speculate.py) asks `crowded` first: with more active sessions than the CPU has room for, idle gaps are
short and such work takes the CPU from what the others ask for.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from typing import MutableMapping

ACTIVE_S = 30.0    # a session whose page last ran this long ago is reading it, or gone
_FORGET_S = 600.0  # entries older than this are dropped (closed tabs)
_seen: dict[str, float] = {}
_lock = threading.Lock()


def session_token(state: MutableMapping) -> str:
    """This session's id, kept in its session state (a fresh one per browser tab)."""
    return state.setdefault("mergescope_session_token", uuid.uuid4().hex)


def mark(state: MutableMapping) -> str:
    """Mark the session whose state this is as seen now; its token."""
    token = session_token(state)
    seen(token)
    return token


def seen(token: str, now: float | None = None) -> None:
    now = time.monotonic() if now is None else now
    with _lock:
        _seen[token] = now
        for old in [k for k, t in _seen.items() if now - t > _FORGET_S]:
            del _seen[old]


def active(now: float | None = None, window_s: float = ACTIVE_S) -> set[str]:
    """The tokens of the sessions whose page ran within `window_s`."""
    now = time.monotonic() if now is None else now
    with _lock:
        return {k for k, t in _seen.items() if now - t <= window_s}


def room(cpus: int | None = None) -> int:
    """How many active sessions a server leaves idle CPU for: one per two cores, at least one (a page's
    merge and scoring use torch's threads; on the 2-core CPU, one)."""
    return max(1, (cpus if cpus is not None else (os.cpu_count() or 1)) // 2)


def crowded(token: str | None, now: float | None = None, cpus: int | None = None) -> bool:
    """Whether sessions other than `token` are active and, with it, more than `room()` are."""
    others = active(now) - {token}
    return bool(others) and len(others) + 1 > room(cpus)


def forget_all() -> None:
    """Tests: start from no sessions."""
    with _lock:
        _seen.clear()
