"""Where every disk cache lives: one home for the cache root."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MERGESCOPE_CACHE, else ~/.cache/mergescope."""
    return Path(os.environ.get("MERGESCOPE_CACHE") or Path.home() / ".cache" / "mergescope").expanduser()
