"""Merge: pick a method, turn its declared knobs, see accuracy move.

The widgets come from the method's declaration (`METHODS[name].hyperparameters`);
nothing here knows a method's knobs or needs. Every method reads the
workspace's MergeInputs (spectra, data statistics), so a rank or α change never
recomputes a per-task SVD and a second merge never recomputes a statistic; which
methods are offered is decided by the one availability check
(`analysis.merging.unavailable`).

URL: `?method=tsv_m&rank_fraction=0.125&alpha=1.0` (plus `split`, `subsample`,
`scale`, and `full=true` when the view is scored on the full split) restores
the method and its knobs; the page keeps the URL in step with them (ui/url.py),
and they survive a page switch.

Session state written for other pages:
    st.session_state["merge_history"]: list of dicts, one per configuration
    (method, knobs, split) scored and looked at in this session, in order
    (ui/history.py decides what is kept; rows can be removed):
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
import time

import pandas as pd
import streamlit as st

from analysis.errors import HyperparameterError, MergescopeError
from analysis.merging import METHODS, available_methods, merge, unavailable
from analysis.merging.scoring import comparison_table, merged_accuracy, wide
from analysis.plots.merge import accuracy_bars
from ui import history, presence, speculate, url
from ui.labelfree import label_free_view
from ui.refine import FIRST_ESTIMATE, Refiner, needs_estimate, wait_for_refinement
from ui.state import (merge_inputs, references, references_on_examples, require_workspace, start_page,
                      with_progress)

RUN_STARTED = time.monotonic()   # history: how long the previous configuration stayed on screen
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


def knob_widget(method: str, hp, key: str, from_url: bool):
    """The knob's widget, kept in the URL under the knob's own name (read only when the URL names `method`)."""
    label = hp.name.replace("_", " ")
    default = hp.default_for(n_tasks)
    default = float(default) if hp.type == "float" else default

    def parse(text: str):
        value = hp.validate(text, method)   # HyperparameterError names the knob and the allowed range
        return float(value) if hp.type == "float" else value

    common = dict(key=key, param=hp.name, default=default, url=from_url, help=hp.help, parse=parse)
    if hp.type == "float":
        return url.widget(st.slider, label, min_value=float(hp.low), max_value=float(hp.high), step=float(hp.step),
                          **common)
    if hp.type == "int":
        fn = st.slider if speculate.is_slider(hp) else st.number_input
        return url.widget(fn, label, min_value=int(hp.low), max_value=int(hp.high), step=int(hp.step or 1), **common)
    if hp.type == "bool":
        return url.widget(st.checkbox, label, **common)
    return url.widget(st.selectbox, label, options=list(hp.choices), **common)


def method_from_url(text: str) -> str:
    if text not in available:
        raise ValueError(f"not available here: {unavailable_here.get(text, 'it is not a method of this version')}")
    return text


# ---------------------------------------------------------------- method and knobs
first_visit = url.first_run("merge_method")   # a fresh session or back from another page
# the method the URL named when this run started: the method box below rewrites the URL, and knobs are
# read from the URL only for the method it named (a switch must not hand α of one method to the next)
url_method = QP.get("method")
left, right = st.columns([1, 2.4])
with left:
    method_name = url.widget(st.selectbox, "Method", key="merge_method", param="method", options=available,
                             default="task_arithmetic", parse=method_from_url)   # the name only: it fits the box
    spec = METHODS[method_name]
    st.caption(f"{spec.summary}. {spec.reference}")
    knobs = {}
    for hp in spec.hyperparameters:
        knobs[hp.name] = knob_widget(method_name, hp, f"merge_{method_name}_{hp.name}",
                                     from_url=url_method == method_name)
    url.drop(*(ALL_KNOBS - set(knobs)))   # the URL holds this method's knobs only
    if not spec.hyperparameters:
        st.caption("This method has no knobs.")
    if unavailable_here:
        with st.expander(f"{len(unavailable_here)} method(s) not available for this set"):
            for name, why in unavailable_here.items():
                st.caption(f"**{name}**: {why}")
    if has_eval:
        split = url.widget(st.radio, "Split", key="merge_split", param="split", options=SPLITS, default="validation",
                           horizontal=True)
        subsample = url.widget(st.number_input, "Examples per task (live)", key="merge_subsample", param="subsample",
                               default=64, min_value=4, max_value=2048, step=16,
                               help="live scoring uses a fixed, seeded subsample of each task's split")
        full = st.button(f"Evaluate on the full {split} split", key="merge_full")

try:
    params = spec.validate(knobs, n_tasks)
except HyperparameterError as exc:
    st.error(str(exc))
    st.stop()
knob_key = json.dumps(params, sort_keys=True)
merge_key = spec.merge_key(params, ws.tvs)   # knobs that give the same merge share its caches
views = st.session_state.setdefault("merge_views", [])   # the last two distinct (method, knobs) on screen
if not views or views[-1] != (method_name, params):
    views[:] = (views + [(method_name, params)])[-2:]
    # a move made before the view it left was final (its refined numbers not on screen yet): a sweep
    st.session_state["merge_sweeping"] = len(views) == 2 and st.session_state.get("merge_final_view") != views[0]
previous_knobs = views[0][1] if len(views) == 2 and views[0][0] == method_name else None
sweeping = previous_knobs is not None and st.session_state.get("merge_sweeping", False)
if spec.note is not None and (note := spec.note(params, ws.tvs)):
    with left:
        st.caption(note)


@st.cache_resource(max_entries=3, show_spinner="Merging…")
def merged_delta(_ws, ws_key: str, method: str, merge_key: str, _knobs_json: str):
    """The merge at `_knobs_json`, cached by `merge_key` (knobs that give the same merge share it)."""
    inputs = merge_inputs(_ws, ws_key)
    with with_progress(inputs, f"{method}: computing data statistics (once per set, cached on disk)"):
        return merge(inputs, method, **json.loads(_knobs_json))


@st.cache_data(max_entries=64, show_spinner="Scoring the merged model…")
def scores(_ws, _delta, ws_key: str, method: str, merge_key: str, split: str, subsample: int | None):
    return merged_accuracy(_ws.evaluator, _delta, split=split, subsample=subsample)


def live_scores(n: int | None, estimate: dict | None):
    """(per_task, references, examples per task, pending): the final numbers, or on a CPU a first
    estimate on FIRST_ESTIMATE examples per task (`estimate` when the speculation scored it already), with
    pending = (key, compute) of the refinement on `n` that the end of the run starts in the background
    (ui.refine.wait_for_refinement)."""
    refined = st.session_state.setdefault("merge_refined", {})
    key = (ws.key, method_name, merge_key, split, n)
    if key in refined:
        return (*refined[key], n, None)
    if not needs_estimate(ws.evaluator.device, n):
        return scores(ws, delta, ws.key, method_name, merge_key, split, n), references(ws, ws.key, split, n), n, None
    ev, d, ws_ = ws.evaluator, delta, ws
    st.session_state.setdefault("merge_refiner", Refiner()).cancel_unless(key)   # no stale one beside the estimate

    def compute(stop):
        return merged_accuracy(ev, d, split, n, stop=stop), references_on_examples(ws_, split, n, stop=stop)
    first = estimate if estimate is not None else scores(ws, delta, ws.key, method_name, merge_key, split,
                                                         FIRST_ESTIMATE)
    return first, references(ws, ws.key, split, FIRST_ESTIMATE), FIRST_ESTIMATE, (key, compute)


def speculation_jobs(n: int | None) -> list:
    """(key, compute) of the knob sets one slider step away (ui.speculate.neighbours), each merged and
    scored on the first estimate's examples; a set whose refined numbers this session holds is skipped
    (going back to it shows them at once)."""
    inputs, ev, split_ = merge_inputs(ws, ws.key), ws.evaluator, split
    refined = st.session_state.get("merge_refined", {})
    jobs = []
    # knob sets that merge as the view does are served from this page's caches: `key` steps past them
    for knobs in speculate.neighbours(spec, params, previous_knobs, n_tasks, key=lambda k: spec.merge_key(k, ws.tvs)):
        key_c = spec.merge_key(knobs, ws.tvs)
        if (ws.key, method_name, key_c, split, n) in refined:
            continue

        def compute(stop, knobs=knobs):
            d = merge(inputs, method_name, stop=stop, **knobs)
            return d, merged_accuracy(ev, d, split_, FIRST_ESTIMATE, stop=stop)
        jobs.append(((ws.key, method_name, key_c, split_), compute))
    return jobs[:speculate.MAX_CANDIDATES]


speculator = st.session_state.setdefault("merge_speculator",
                                         speculate.Speculator(presence.session_token(st.session_state)))
view_key = (ws.key, method_name, merge_key, split if has_eval else None)
# a move onto a speculated neighbour takes its merge and estimate; any other move stops the speculation first,
# and the refinement of the view it left, so the merge has the CPU
st.session_state.setdefault("merge_refiner", Refiner()).cancel_unless_view(view_key)   # its key's first four
speculated = speculator.take(view_key)
merge_seconds = st.session_state.setdefault("merge_seconds", {})   # method -> its last merge computed here
try:
    t0 = time.perf_counter()
    delta = speculated[0] if speculated is not None else merged_delta(ws, ws.key, method_name, merge_key, knob_key)
    took = time.perf_counter() - t0
    if speculated is None and took > speculate.COMPUTED_S:   # not a cached merge
        merge_seconds[method_name] = took
except MergescopeError as exc:
    st.error(str(exc))
    st.stop()

with right:
    if not has_eval:
        label_free_view(ws, delta, method_name, params)  # agreement with each fine-tuned model, per-layer distances
        st.stop()

    if full or (first_visit and QP.get("full") == "true"):   # the button, or a link to a full-split view
        st.session_state["merge_full_for"] = (method_name, knob_key, split)
    evaluate_full = st.session_state.get("merge_full_for") == (method_name, knob_key, split)
    if evaluate_full:
        url.set_param("full", True)
    else:
        url.drop("full")
    n = None if evaluate_full else int(subsample)
    try:
        per_task, reference, n_shown, pending = live_scores(n, speculated[1] if speculated is not None else None)
    except MergescopeError as exc:
        st.error(str(exc))
        st.stop()
    refinement_slot = st.empty() if pending is not None else None   # its caption while the refinement runs
    table = comparison_table(per_task, reference, split)
    scale = url.widget(st.radio, "Scale", key="merge_scale", param="scale", default="absolute",
                       options=["absolute", "normalised (÷ fine-tuned)"], horizontal=True)
    normalized = scale != "absolute"
    where = (f"full {split} split" if n_shown is None else f"{split} subsample of {n_shown} per task") + \
        " · references on the same examples"
    if delta.per_task:
        where += " · each task scored with its own model (per-task method)"
    st.plotly_chart(accuracy_bars(table, normalized=normalized, title=method_name, subtitle=where),
                    width="stretch")
    shown = wide(table, "normalized" if normalized else "accuracy")
    st.dataframe(shown.style.format("{:.2%}", na_rep="–"), width="stretch")

    history.record({"method": method_name, "knobs": params, "split": split, "subsample": n_shown,
                    "per_task": per_task, "mean": sum(per_task.values()) / max(1, len(per_task))}, RUN_STARTED)

st.subheader("Configurations kept in this session")
st.caption(f"One row per configuration scored and kept on screen for {history.DWELL_S:g} s or more (or the one "
           "left for another page); scoring a kept one again on more examples replaces its row. Row 'now' is "
           "the one on screen.")
rows = [{"#": i, "method": h["method"], "knobs": ", ".join(f"{k}={url.to_text(v)}" for k, v in h["knobs"].items()),
         "split": h["split"], "examples": "full" if h.get("subsample") is None else h["subsample"],
         "mean accuracy (%)": 100 * h["mean"], **{t: 100 * a for t, a in h["per_task"].items()}}
        for i, h in history.shown_entries()]
st.dataframe(pd.DataFrame(rows).round(2), width="stretch", hide_index=True)
st.caption("Accuracy in %, on the split and number of examples per task of each row.")
history.removal_control("merge_history")


# merging neighbours in the background: CPU, resident sets, data-free methods
speculating = has_eval and speculate.enabled() and ws.tvs.is_resident and needs_estimate(ws.evaluator.device, n) \
    and not (spec.needs.labelled_data or spec.needs.activations or spec.needs.gradients)
if refinement_slot is None:
    # the view is final: merge its neighbours while the user looks at it
    st.session_state["merge_final_view"] = (method_name, params)
    st.session_state["merge_sweeping"] = False   # a sweep ends with a final view (a subsample change is not one)
    if speculating:
        speculator.request(speculation_jobs(n), keep=view_key)
else:
    pending_key, compute = pending
    # in a sweep the next move likely comes before this view's refined numbers: merge it (the same move
    # again) first, then refine, where this method's merges are quick (ui/speculate.py: AHEAD_MAX_S); a user
    # who stops gets the refined numbers one merge later
    ahead = sweeping and speculating and merge_seconds.get(method_name, float("inf")) <= speculate.AHEAD_MAX_S
    if ahead:
        speculator.request(speculation_jobs(n)[:1], keep=view_key)
    wait_for_refinement(st.session_state["merge_refiner"], pending_key, compute, refinement_slot,
                        lambda result: st.session_state["merge_refined"].__setitem__(pending_key, result),
                        f"First estimate on {FIRST_ESTIMATE} examples per task (CPU); "
                        f"{'merging the next step, then ' if ahead else ''}scoring "
                        f"{'the full split' if pending_key[-1] is None else f'{pending_key[-1]} per task'} in the "
                        "background…", after=speculator.idle if ahead else None)
