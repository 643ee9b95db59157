"""Merge: pick a method, turn its declared knobs, see accuracy move.

The widgets come from the method's declaration (`METHODS[name].hyperparameters`);
nothing here knows a method's knobs or needs. Every method reads the
workspace's MergeInputs (spectra, data statistics), so a rank or α change never
recomputes a per-task SVD and a second merge never recomputes a statistic; which
methods are offered is decided by the one availability check
(`analysis.merging.unavailable`).

URL: `?method=tsv_m&rank_fraction=0.125&alpha=1.0` (plus `split`, `subsample`)
restores the method and its knobs; the page keeps the URL in step with them.

Session state written for other pages:
    st.session_state["merge_history"]: list of dicts, one per configuration
    evaluated in this session, in order:
        {"method": str,                 # a key of analysis.merging.METHODS
         "knobs": {name: value},        # every declared knob, validated values
         "split": "validation" | "test",
         "subsample": int | None,       # examples per task; None = full split
         "per_task": {task: accuracy},  # accuracy in [0, 1]
         "mean": float}                 # mean of per_task
    (pages/5_Report.py and pages/4_Loss_Landscape.py read it.)
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from analysis.errors import HyperparameterError, MergescopeError
from analysis.merging import METHODS, available_methods, merge, unavailable
from analysis.merging.scoring import comparison_table, merged_accuracy, wide
from analysis.plots.merge import accuracy_bars
from ui.labelfree import label_free_view
from ui.state import merge_inputs, require_workspace, start_page, with_progress

HISTORY_KEY = "merge_history"
SPLITS = ("validation", "test")
ALL_KNOBS = {hp.name for m in METHODS.values() for hp in m.hyperparameters}

start_page("Merge")
ws = require_workspace()
tvs = ws.tvs
n_tasks = len(tvs.tasks)
QP = st.query_params
has_eval = ws.evaluator is not None
has_data = merge_inputs(ws, ws.key).has_data
available = available_methods(n_tasks, has_data)
unavailable_here = {name: unavailable(name, n_tasks, has_data) for name in METHODS if name not in available}


def url_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def initial_knob(method: str, hp) -> object:
    """The URL's value when the URL names this method, else the declared default."""
    value = hp.default_for(n_tasks)
    if QP.get("method") == method and hp.name in QP:
        try:
            value = hp.validate(QP[hp.name], method)
        except HyperparameterError as exc:
            st.warning(f"Ignoring the URL's value: {exc}")
    if hp.type == "float":
        value = float(value)
    return value


def knob_widget(method: str, hp, key: str):
    label = hp.name.replace("_", " ")
    if hp.type == "float":
        return st.slider(label, float(hp.low), float(hp.high), step=float(hp.step), key=key, help=hp.help)
    if hp.type == "int":
        if hp.high - hp.low <= 64:
            return st.slider(label, int(hp.low), int(hp.high), step=int(hp.step or 1), key=key, help=hp.help)
        return st.number_input(label, int(hp.low), int(hp.high), step=int(hp.step or 1), key=key, help=hp.help)
    if hp.type == "bool":
        return st.checkbox(label, key=key, help=hp.help)
    return st.selectbox(label, list(hp.choices), key=key, help=hp.help)


# ---------------------------------------------------------------- method and knobs
if "merge_method" not in st.session_state:
    wanted = QP.get("method")
    if wanted is not None and wanted not in available:
        why = unavailable_here.get(wanted, "it is not a method of this version")
        st.warning(f"The URL asks for method {wanted!r}, which is not available here: {why}.")
    st.session_state["merge_method"] = wanted if wanted in available else "task_arithmetic"
if "merge_split" not in st.session_state:
    st.session_state["merge_split"] = QP.get("split") if QP.get("split") in SPLITS else "validation"
if "merge_subsample" not in st.session_state:
    try:
        st.session_state["merge_subsample"] = max(4, min(2048, int(QP.get("subsample", 64))))
    except ValueError:
        st.session_state["merge_subsample"] = 64

left, right = st.columns([1, 2.4])
with left:
    method_name = st.selectbox("Method", available, key="merge_method")   # the name only: it fits the box
    spec = METHODS[method_name]
    st.caption(f"{spec.summary}. {spec.reference}")
    knobs = {}
    for hp in spec.hyperparameters:
        key = f"merge_{method_name}_{hp.name}"
        if key not in st.session_state:
            st.session_state[key] = initial_knob(method_name, hp)
        knobs[hp.name] = knob_widget(method_name, hp, key)
    if not spec.hyperparameters:
        st.caption("This method has no knobs.")
    if unavailable_here:
        with st.expander(f"{len(unavailable_here)} method(s) not available for this set"):
            for name, why in unavailable_here.items():
                st.caption(f"**{name}**: {why}")
    if has_eval:
        split = st.radio("Split", SPLITS, key="merge_split", horizontal=True)
        subsample = st.number_input("Examples per task (live)", 4, 2048, step=16, key="merge_subsample",
                                    help="live scoring uses a fixed, seeded subsample of each task's split")
        full = st.button(f"Evaluate on the full {split} split", key="merge_full")

# keep the URL in step: this method's knobs only
QP["method"] = method_name
for name in ALL_KNOBS - set(knobs):
    if name in QP:
        del QP[name]
for name, value in knobs.items():
    QP[name] = url_text(value)
if has_eval:
    QP["split"] = split
    QP["subsample"] = str(int(subsample))

try:
    params = spec.validate(knobs, n_tasks)
except HyperparameterError as exc:
    st.error(str(exc))
    st.stop()
knob_key = json.dumps(params, sort_keys=True)


@st.cache_resource(max_entries=3, show_spinner="Merging…")
def merged_delta(_ws, ws_key: str, method: str, knobs_json: str):
    inputs = merge_inputs(_ws, ws_key)
    with with_progress(inputs, f"{method}: computing data statistics (once per set, cached on disk)"):
        return merge(inputs, method, **json.loads(knobs_json))


@st.cache_data(max_entries=64, show_spinner="Scoring the merged model…")
def scores(_ws, _delta, ws_key: str, method: str, knobs_json: str, split: str, subsample: int | None):
    return merged_accuracy(_ws.evaluator, _delta, split=split, subsample=subsample)


try:
    delta = merged_delta(ws, ws.key, method_name, knob_key)
except MergescopeError as exc:
    st.error(str(exc))
    st.stop()

with right:
    if not has_eval:
        label_free_view(ws, delta, method_name, params)  # agreement with each fine-tuned model, per-layer distances
        st.stop()

    evaluate_full = st.session_state.get("merge_full_for") == (method_name, knob_key, split) or full
    if full:
        st.session_state["merge_full_for"] = (method_name, knob_key, split)
    n = None if evaluate_full else int(subsample)
    try:
        per_task = scores(ws, delta, ws.key, method_name, knob_key, split, n)
    except MergescopeError as exc:
        st.error(str(exc))
        st.stop()
    table = comparison_table(per_task, ws.reference, split)
    scale = st.radio("Scale", ["absolute", "normalised (÷ fine-tuned)"], horizontal=True, key="merge_scale")
    normalized = scale != "absolute"
    where = f"full {split} split" if n is None else f"{split} subsample of {n} per task"
    if delta.per_task:
        where += " · each task scored with its own model (per-task method)"
    st.plotly_chart(accuracy_bars(table, normalized=normalized, title=method_name, subtitle=where),
                    width="stretch")
    shown = wide(table, "normalized" if normalized else "accuracy")
    st.dataframe(shown.style.format("{:.2%}", na_rep="–"), width="stretch")

    history = st.session_state.setdefault(HISTORY_KEY, [])
    entry = {"method": method_name, "knobs": params, "split": split, "subsample": n,
             "per_task": per_task, "mean": sum(per_task.values()) / max(1, len(per_task))}
    if not any(h.get("method") == entry["method"] and h.get("knobs") == entry["knobs"] and h.get("split") == split
               and h.get("subsample") == n for h in history):
        history.append(entry)

st.subheader("Configurations tried in this session")
rows = [{"#": i, "method": h["method"], "knobs": ", ".join(f"{k}={url_text(v)}" for k, v in h["knobs"].items()),
         "split": h["split"], "examples": "full" if h.get("subsample") is None else h["subsample"],
         "mean accuracy (%)": 100 * h["mean"], **{t: 100 * a for t, a in h["per_task"].items()}}
        for i, h in enumerate(st.session_state[HISTORY_KEY], 1)]
st.dataframe(pd.DataFrame(rows).round(2), width="stretch", hide_index=True)
st.caption("Accuracy in %, on the split and number of examples per task of each row.")
