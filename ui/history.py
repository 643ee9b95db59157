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

from analysis.errors import MergescopeError
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


# ---------------------------------------------------------------- history rows in a link (the Report page)
def entry_text(entry: Mapping) -> str:
    """'tsv_m (alpha=1.0, rank_fraction=0.125) @ validation · 64': a row's recipe and how it was scored."""
    from ui.endpoints import MERGE_PREFIX, recipe_label
    n = entry.get("subsample")
    return (f"{recipe_label(entry['method'], entry.get('knobs') or {}).removeprefix(MERGE_PREFIX)} @ "
            f"{entry.get('split', 'validation')} · {'full' if n is None else int(n)}")


def entry_from_text(text: str, tvs, has_data: bool) -> dict:
    """{"method", "knobs", "split", "subsample"} a link's row names; ValueError saying what is wrong."""
    from ui.endpoints import MERGE_PREFIX, endpoint_from_label
    recipe, sep, scoring = text.rpartition(" @ ")
    spec = endpoint_from_label(MERGE_PREFIX + recipe, tvs, has_data) if sep else None
    if spec is None or "task" in spec:
        raise ValueError("not a merge recipe of this set (a method offered here and valid knobs)")
    split, sep, n = scoring.partition(" · ")
    if split not in ("validation", "test") or not sep or not (n == "full" or n.isdigit()):
        raise ValueError("expected '@ validation|test · full|<examples per task>' after the recipe")
    return {"method": spec["method"], "knobs": spec["knobs"], "split": split,
            "subsample": None if n == "full" else int(n)}


def score_entry(ws, method: str, knobs: Mapping, split: str, subsample: int | None) -> dict:
    """A history row scored as the Merge page scores it (same merge, same seeded subsample)."""
    from analysis.merging import merge
    from analysis.merging.scoring import merged_accuracy
    from ui.state import merge_inputs
    delta = merge(merge_inputs(ws, ws.key), method, **dict(knobs))
    per_task = merged_accuracy(ws.evaluator, delta, split=split, subsample=subsample)
    return {"method": method, "knobs": dict(knobs), "split": split, "subsample": subsample, "per_task": per_task,
            "mean": sum(per_task.values()) / max(1, len(per_task))}


def restore_from_link(ws, param: str) -> None:
    """Score and add the rows a link lists in `param` that this session's history lacks (a link opened in a
    new session shows the rows it was made with). Bad rows are reported and skipped."""
    texts = [t for t in st.query_params.get_all(param) if t]
    if not texts or ws.evaluator is None:
        return
    has_data = ws.evaluator is not None
    present = {(recipe_key(e), e.get("subsample")) for e in entries()}
    for text in texts:
        try:
            wanted = entry_from_text(text, ws.tvs, has_data)
        except ValueError as exc:
            st.warning(f"Ignoring the link's history row `{text}`: {exc}")
            continue
        if (recipe_key(wanted), wanted["subsample"]) in present:
            continue
        try:
            with st.spinner(f"Scoring the link's configuration {text}…"):
                _store(score_entry(ws, **wanted))
        except MergescopeError as exc:
            st.warning(f"Could not score the link's history row `{text}`: {exc}")
