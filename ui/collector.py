"""Keeping Streamlit's garbage collection after every run off a slider move's path.

Streamlit ends every script run with a full collection (`runner.postScriptGC`, on by default: gc.collect(2)),
and a run that a slider move stops ends too, so that collection comes between the key press and the start of
the move's own run. With the app's modules and the quick demo loaded, the collector tracks about 500 000
objects (imports 344 000, the workspace 167 000 more) and one full collection took 0.23 s in-process; in the
server, py-spy saw 0.23–0.45 s of `_on_script_finished` per move (docs/results_live.md). Nearly all of those
objects live as long as the process (modules, functions, the workspace), so `freeze_long_lived` moves them to
the collector's permanent generation (`gc.freeze`), which collections skip: the collection after a run then
examines only what runs made since (in-process: below 1 ms).

Streamlit's collection is kept (a run's cyclic garbage, such as a stopped run's traceback holding a merged
model, is still freed at once). What is frozen is never examined while frozen, so an object frozen while in
use that later becomes cyclic garbage would stay; every refreeze therefore unfreezes and collects everything
first (one full collection, 0.2–0.4 s), and it happens only when FREEZE_GROWTH objects have survived since the
last one (a page's first run in the process, a newly loaded workspace), not on slider moves.
"""
from __future__ import annotations

import gc
import threading

FREEZE_GROWTH = 50_000   # unfrozen long-lived objects that make the next page run refreeze (a collection of
                         # that many costs about 0.02 s)
_LOCK = threading.Lock()


def freeze_long_lived(growth: int = FREEZE_GROWTH) -> bool:
    """Unfreeze, collect and freeze again when at least `growth` objects are in the oldest generation (they
    survived a full collection: Streamlit's after the previous run); True when it did."""
    with _LOCK:
        if len(gc.get_objects(generation=2)) < growth:
            return False
        gc.unfreeze()   # what was frozen before and has become garbage since is freed now
        gc.collect()
        gc.freeze()
        return True
