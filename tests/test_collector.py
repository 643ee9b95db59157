"""ui/collector.py: long-lived objects leave the collections Streamlit runs after every script run, and what
was frozen and became garbage since is freed at the next refreeze."""
from __future__ import annotations

import gc
import weakref

import pytest

from ui.collector import freeze_long_lived


class _Node:
    pass


@pytest.fixture(autouse=True)
def _unfrozen_after():
    yield
    gc.unfreeze()
    gc.collect()


def test_long_lived_objects_are_frozen_once_enough_survived():
    gc.collect()
    gc.unfreeze()
    gc.collect()
    kept = [[i] for i in range(30_000)]          # long-lived: they survive the full collection below
    gc.collect()
    assert len(gc.get_objects(generation=2)) >= 30_000
    assert freeze_long_lived(growth=20_000)
    assert gc.get_freeze_count() >= 30_000
    assert len(gc.get_objects(generation=2)) < 1_000   # a full collection now examines almost nothing
    assert not freeze_long_lived(growth=20_000)          # nothing new survived: no refreeze
    assert kept[-1] == [29_999]


def test_a_frozen_cycle_that_became_garbage_is_freed_at_the_next_refreeze():
    gc.collect()
    a, b = _Node(), _Node()
    a.other, b.other = b, a                               # a cycle: only the collector frees it
    gone = weakref.ref(a)
    filler = [[i] for i in range(30_000)]
    gc.collect()
    assert freeze_long_lived(growth=20_000)
    del a, b
    gc.collect()
    assert gone() is not None                             # frozen: collections skip it
    more = [[i] for i in range(30_000)]                   # enough new long-lived objects for a refreeze
    gc.collect()
    assert freeze_long_lived(growth=20_000)
    assert gone() is None
    assert filler and more
