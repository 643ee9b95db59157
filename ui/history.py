"""The session's history of merge configurations: one row per configuration looked at, removable.

st.session_state["merge_history"] is the list other pages read (its entry
format is documented in pages/3_Merge.py). The Merge page adds a scored
configuration with `record` only after its scores are drawn, and only once:
the same recipe (method, knobs, split) is one row, whose scores are replaced
when it is scored again on at least as many examples (the full split beats a
subsample). The configuration on screen is first *pending*: it becomes a row
when the user stays on it for DWELL_S seconds, or leaves the page; moving on
to another configuration sooner (a slider stepped with the arrow keys) drops
it. `entries()` (any other page) keeps the pending one, since leaving the
Merge page while looking at a configuration is choosing it.
"""
from __future__ import annotations

import json
import time
from typing import Mapping

import streamlit as st

from analysis.report import config_label

HISTORY_KEY = "merge_history"
PENDING_KEY = "merge_history_pending"   # (entry, time the run that drew it started)
DWELL_S = 2.0   # a choice, not a measurement: long enough to read a bar chart, longer than a key repeat


def recipe_key(entry: Mapping) -> tuple:
    return entry["method"], json.dumps(entry.get("knobs") or {}, sort_keys=True, default=str), entry.get("split")


def _examples(entry: Mapping) -> float:
    n = entry.get("subsample")
    return float("inf") if n is None else float(n)


def _store(entry: dict) -> None:
    """Add `entry`, or replace its recipe's row when it was scored on at least as many examples."""
    history = st.session_state.setdefault(HISTORY_KEY, [])
    for i, old in enumerate(history):
        if recipe_key(old) == recipe_key(entry):
            if _examples(entry) >= _examples(old):
                history[i] = entry
            return
    history.append(entry)


def record(entry: dict, run_started: float | None = None) -> None:
    """The Merge page drew `entry`'s scores in a run that started at `run_started` (time.monotonic())."""
    now = time.monotonic() if run_started is None else run_started
    pending = st.session_state.get(PENDING_KEY)
    if pending is not None:
        old, shown = pending
        if recipe_key(old) == recipe_key(entry):
            if _examples(entry) >= _examples(old):
                st.session_state[PENDING_KEY] = (entry, shown)
            return
        if now - shown >= DWELL_S:
            _store(old)
    st.session_state[PENDING_KEY] = (entry, time.monotonic())


def commit_pending() -> None:
    pending = st.session_state.pop(PENDING_KEY, None)
    if pending is not None:
        _store(pending[0])


def entries() -> list[dict]:
    """The history, the configuration last on screen on the Merge page included (a copy)."""
    commit_pending()
    return list(st.session_state.get(HISTORY_KEY, []))


def shown_entries() -> list[tuple[str, dict]]:
    """(label, entry) for the Merge page's table: the kept rows, then the one on screen (label 'now')."""
    rows = [(str(i), e) for i, e in enumerate(st.session_state.get(HISTORY_KEY, []), 1)]
    pending = st.session_state.get(PENDING_KEY)
    if pending is not None and not any(recipe_key(e) == recipe_key(pending[0]) for _, e in rows):
        rows.append(("now", pending[0]))
    return rows


def _remove(pick_key: str, labels: list[str]) -> None:
    chosen = set(st.session_state.get(pick_key) or [])
    history = st.session_state.get(HISTORY_KEY, [])
    st.session_state[HISTORY_KEY] = [e for label, e in zip(labels, history) if label not in chosen]
    st.session_state[pick_key] = []


def removal_control(key: str) -> None:
    """A multiselect of the kept rows (labelled as the Report labels them) and a Remove button."""
    history = st.session_state.get(HISTORY_KEY, [])
    if not history:
        return
    labels = [config_label(i, e) for i, e in enumerate(history, 1)]
    pick_key = f"{key}_remove_pick"
    c1, c2 = st.columns([5, 1], vertical_alignment="bottom")
    chosen = c1.multiselect("Remove configurations from the history", labels, key=pick_key,
                            placeholder="choose rows to remove")
    c2.button("Remove", key=f"{key}_remove", disabled=not chosen, on_click=_remove, args=(pick_key, labels))
