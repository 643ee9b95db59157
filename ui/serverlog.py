"""The engine's log lines in the server's output (`streamlit run` only).

The `analysis` loggers say when heavy work happens (an SVD of a whole set,
a task's statistics) and when a fallback is taken (smaller batches, the
CPU, a cache that could not be written). $MERGESCOPE_LOG sets the level
(default WARNING: only fallbacks and failures; INFO adds every
computation, which benchmarks/sessions.py counts).
"""
from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "mergescope-server"


def install() -> bool:
    """Attach one stderr handler to the `analysis` logger; True when attached now."""
    if "streamlit.web.bootstrap" not in sys.modules:
        return False
    logger = logging.getLogger("analysis")
    if any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel((os.environ.get("MERGESCOPE_LOG") or "WARNING").upper())
    return True
