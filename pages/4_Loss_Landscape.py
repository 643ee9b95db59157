"""Loss Landscape: loss and accuracy along straight paths, with both barrier definitions.

Paths: between any two parameter sets (pretrained, each fine-tuned model, a
merge), or the scaling path θ0 + α·δ of a merge. Live on a validation
subsample; on the full split on request. Choices live in the URL (ll_* query
parameters), so a link reopens the same view.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import streamlit as st

from analysis.errors import MergescopeError
from analysis.barriers import BARRIERS
from analysis.landscape import barrier_table, barriers, best_scale, delta_path, lambda_grid, scaling_path
from analysis.plots.landscape import path_figure
from ui.endpoints import PRETRAINED, delta_of, endpoint_options, spec_key
from ui.state import merge_inputs, require_workspace, start_page

start_page("Loss Landscape", "Loss landscape")
ws = require_workspace()
if ws.evaluator is None:
    st.info("Loss and accuracy need labelled data and task heads: this page works on the built-in demo "
            "(or any workspace that comes with an evaluator). Your own checkpoints have none.")
    st.stop()

tvs = ws.tvs
tasks_all = list(ws.evaluator.tasks)
history = st.session_state.get("merge_history", [])
LINE, SCALE = "Between two models", "Scaling path θ₀ + α·δ"
QP = st.query_params


def from_query(key: str, options=None, cast=str, default=None):
    """Widget default: session value, else the URL's query parameter, else `default`."""
    if key in st.session_state:
        return st.session_state[key]
    if key in QP:
        try:
            v = cast(QP[key])
            if options is None or v in options:
                return v
        except (TypeError, ValueError):
            pass
    return default


def remember(**values) -> None:
    for k, v in values.items():
        QP[k] = str(v)


path_kind = st.radio("Path", [LINE, SCALE], horizontal=True, key="ll_path",
                     index=[LINE, SCALE].index(from_query("ll_path", [LINE, SCALE], default=LINE)))
c1, c2, c3 = st.columns([2, 2, 1])
if path_kind == LINE:
    options = endpoint_options(tvs, history, has_data=True)
    labels = list(options)
    start = c1.selectbox("Start (λ = 0)", labels, key="ll_start",
                         index=labels.index(from_query("ll_start", labels, default=PRETRAINED)))
    default_end = next((l for l in labels if l.startswith("fine-tuned")), labels[-1])
    end = c2.selectbox("End (λ = 1)", labels, key="ll_end",
                       index=labels.index(from_query("ll_end", labels, default=default_end)))
    points = c3.slider("λ points", 3, 21, int(from_query("ll_points", cast=int, default=5)), step=1, key="ll_points",
                       help="evenly spaced from 0 to 1, both ends included (barriers need them)")
    remember(ll_path=path_kind, ll_start=start, ll_end=end, ll_points=points)
else:
    options = endpoint_options(tvs, history, include_sum=True, has_data=True)
    labels = [l for l in options if options[l]["kind"] != "pretrained"]
    default_delta = next((l for l in labels if l.startswith("merge")), labels[0])
    delta_label = c1.selectbox("Delta δ", labels, key="ll_delta",
                               index=labels.index(from_query("ll_delta", labels, default=default_delta)))
    lo, hi = c2.slider("α range", 0.0, 3.0, (0.0, 1.5), step=0.05, key="ll_alpha")
    points = c3.slider("α points", 3, 21, int(from_query("ll_points", cast=int, default=5)), step=1, key="ll_points")
    remember(ll_path=path_kind, ll_delta=delta_label, ll_points=points)

d1, d2, d3 = st.columns([1, 1, 2])
split = d1.selectbox("Split", ["validation", "test"], key="ll_split",
                     index=["validation", "test"].index(from_query("ll_split", ["validation", "test"], default="validation")))
subsample = d2.select_slider("Live subsample (examples per task)", [8, 16, 32, 64, 128, 256], key="ll_sub",
                             value=int(from_query("ll_sub", cast=int, default=128)),
                             help="live evaluation cost grows with points × tasks × examples; the full split is a toggle below")
tasks = d3.multiselect("Tasks", tasks_all, default=tasks_all, key="ll_tasks")
remember(ll_split=split, ll_sub=subsample)
full = st.toggle("Full split (slower: every example of the split)", key="ll_full", value=False)
if not tasks:
    st.info("Pick at least one task.")
    st.stop()


def run_path(progress):
    """Curves for the current choices.

    Memoised per point: every evaluated (path, split, subsample, tasks, λ or α)
    is kept in the workspace, so a grid change only evaluates the new points
    (0 and 1 are shared by every λ grid, all of a 5-point grid by the 9-point one).
    """
    memo = ws.extras.setdefault("landscape_points", {})
    n = None if full else int(subsample)
    inputs = merge_inputs(ws, ws.key)
    evaluate = functools.partial(ws.evaluator.evaluate, split=split, subsample=n, tasks=tasks)
    if path_kind == LINE:
        sa, sb = options[start], options[end]
        coord, grid = "lam", lambda_grid(points)
        path_key = ("line", spec_key(sa), spec_key(sb), split, n, tuple(tasks))

        def compute(xs, report):
            return delta_path(evaluate, tvs.apply({}), delta_of(ws, sa, inputs),
                              delta_of(ws, sb, inputs), xs, progress=report)
    else:
        sd = options[delta_label]
        coord, grid = "alpha", np.linspace(lo, hi, points)
        path_key = ("scale", spec_key(sd), split, n, tuple(tasks))

        def compute(xs, report):
            return scaling_path(evaluate, tvs.apply({}), delta_of(ws, sd, inputs), xs, progress=report)
    keys = [(path_key, round(float(x), 9)) for x in grid]
    missing = [float(x) for x, k in zip(grid, keys) if k not in memo]
    if missing:
        fresh = compute(missing, progress)
        for x, g in fresh.groupby(coord, sort=False):
            memo[(path_key, round(float(x), 9))] = g
        while len(memo) > 2000:  # bounded: each entry is a few rows
            memo.pop(next(iter(memo)))
    st.session_state["ll_points_evaluated"] = len(missing)
    return pd.concat([memo[k] for k in keys], ignore_index=True)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_barriers(curves):
    return barriers(curves)


bar = st.progress(0.0, text="evaluating…")
t0 = time.perf_counter()
try:
    curves = run_path(lambda f, m: bar.progress(f, text=f"evaluating {m}"))
except MergescopeError as exc:
    bar.empty()
    st.error(str(exc))
    st.stop()
bar.empty()
elapsed = time.perf_counter() - t0
st.session_state["ll_last_seconds"] = elapsed

n_used = int(curves["n"].max()) if "n" in curves else None
path_coord = "lam" if path_kind == LINE else "alpha"
scope = "full split" if full else f"subsample of {subsample} per task"
st.caption(f"{split} split, {scope}{f' (n ≤ {n_used})' if n_used else ''} · {elapsed:.2f} s for "
           f"{st.session_state['ll_points_evaluated']} new of {curves[path_coord].nunique()} points × {len(tasks)} tasks "
           "(evaluated points are kept: moving back costs nothing)")

if path_kind == LINE:
    title = f"{start} → {end}"
    fig = path_figure(curves, tasks_all, "lam", title=title, start_label="start", end_label="end",
                      subtitle=f"{split} split, {scope}")
    st.plotly_chart(fig, key="ll_figure", config={"displaylogo": False})
    bar_df = cached_barriers(curves)
    st.subheader("Barriers")
    for b in BARRIERS.values():
        st.markdown(f"**{b.label}**")
        st.latex(b.latex)
    st.caption("The same two definitions, by the same names, on the Alignment page (analysis/barriers.py). "
               "For accuracy they are applied to the accuracy drop, so a positive barrier is always *worse than "
               "the ends*; accuracy barriers in percentage points. A monotone straight-line path has 0 under both.")
    t_loss, t_acc = st.tabs(["loss (nats)", "accuracy (points)"])
    with t_loss:
        st.dataframe(barrier_table(bar_df, "loss").round(4), hide_index=True)
    with t_acc:
        st.dataframe(barrier_table(bar_df, "accuracy", scale=100.0).round(2), hide_index=True)
    ws.extras["landscape_last"] = {"title": title, "curves": curves, "barriers": bar_df}
else:
    fig = path_figure(curves, tasks_all, "alpha", title=f"θ₀ + α·δ, δ = {delta_label}", subtitle=f"{split} split, {scope}")
    st.plotly_chart(fig, key="ll_figure", config={"displaylogo": False})
    best = best_scale(curves, "alpha")
    n_text = ", ".join(f"{t} {n}" for t, n in best["n_per_task"].items())
    tied = ", ".join(f"{a:.3g}" for a in best["tied"])
    st.markdown(f"Best mean accuracy over the chosen tasks: **{best['mean'] * 100:.1f} %** (± {best['se'] * 100:.1f}, "
                f"one standard error) at **α = {best['at']:.3g}**, on the {split} split, examples per task: {n_text}."
                + (f" Within two standard errors of it, so not resolved at this sample size: α = {tied}." if tied
                   else ""))
    ws.extras["landscape_last"] = {"title": f"scaling path of {delta_label}", "curves": curves}

with st.expander("Data (tidy table)"):
    st.dataframe(curves, hide_index=True)
    st.download_button("Download the curves (CSV)", curves.to_csv(index=False).encode(), "landscape_curves.csv",
                       "text/csv", key="ll_csv")
