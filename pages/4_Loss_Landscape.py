"""Loss Landscape: loss and accuracy along straight paths, with both barrier definitions.

Paths: between any two parameter sets (pretrained, each fine-tuned model, a
merge), or the scaling path θ0 + α·δ of a merge. Live on a validation
subsample; on the full split on request. Choices live in the URL (ll_* query
parameters, ui/url.py), so a link reopens the same view; a merge endpoint is
named by its recipe (method and knobs), so the link works in a new session.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import streamlit as st

from analysis.errors import MergescopeError
from analysis.barriers import BARRIERS
from analysis.landscape import barrier_table, barriers, best_scale, delta_path, lambda_grid, scaling_path, spread_order
from analysis.plots.landscape import path_figure
from ui import history, url
from ui.endpoints import PRETRAINED, delta_of, endpoint_options, spec_key
from ui.refine import FIRST_ESTIMATE, Refiner, another_fits, estimate_budget_s, needs_estimate, wait_for_refinement
from ui.state import merge_inputs, require_workspace, start_page

start_page("Loss Landscape", "Loss landscape")
ws = require_workspace()
if ws.evaluator is None:
    st.info("Loss and accuracy need labelled data and task heads: this page works on the built-in demo "
            "(or any workspace that comes with an evaluator). Your own checkpoints have none.")
    st.stop()

tvs = ws.tvs
tasks_all = list(ws.evaluator.tasks)
merge_history = history.entries()
LINE, SCALE = "Between two models", "Scaling path θ₀ + α·δ"
QP = st.query_params

path_kind = url.widget(st.radio, "Path", key="ll_path", options=[LINE, SCALE], default=LINE, horizontal=True)
c1, c2, c3 = st.columns([2, 2, 1])
# endpoints a link names by recipe ("merge: tsv_m (alpha=1.0, rank_fraction=0.125)") are offered even when this
# session never tried them
wanted = [QP.get(k) for k in ("ll_start", "ll_end", "ll_delta")]
if path_kind == LINE:
    options = endpoint_options(tvs, merge_history, has_data=True, wanted=wanted)
    labels = list(options)
    start = url.widget(c1.selectbox, "Start (λ = 0)", key="ll_start", options=labels, default=PRETRAINED)
    default_end = next((l for l in labels if l.startswith("fine-tuned")), labels[-1])
    end = url.widget(c2.selectbox, "End (λ = 1)", key="ll_end", options=labels, default=default_end)
    points = url.widget(c3.slider, "λ points", key="ll_points", default=5, min_value=3, max_value=21, step=1,
                        help="evenly spaced from 0 to 1, both ends included (barriers need them)")
    url.drop("ll_delta", "ll_alpha")
else:
    options = endpoint_options(tvs, merge_history, include_sum=True, has_data=True, wanted=wanted)
    labels = [l for l in options if options[l]["kind"] != "pretrained"]
    default_delta = next((l for l in labels if l.startswith("merge")), labels[0])
    delta_label = url.widget(c1.selectbox, "Delta δ", key="ll_delta", options=labels, default=default_delta)
    lo, hi = url.widget(c2.slider, "α range", key="ll_alpha", default=(0.0, 1.5), min_value=0.0, max_value=3.0,
                        step=0.05)
    points = url.widget(c3.slider, "α points", key="ll_points", default=5, min_value=3, max_value=21, step=1)
    url.drop("ll_start", "ll_end")

d1, d2, d3 = st.columns([1, 1, 2])
split = url.widget(d1.selectbox, "Split", key="ll_split", options=["validation", "test"], default="validation")
subsample = url.widget(d2.select_slider, "Live subsample (examples per task)", key="ll_sub",
                       options=[8, 16, 32, 64, 128, 256], default=128,
                       help="live evaluation cost grows with points × tasks × examples; the full split is a toggle "
                            "below")
tasks = url.widget(d3.multiselect, "Tasks", key="ll_tasks", options=tasks_all, default=list(tasks_all))
full = url.widget(st.toggle, "Full split (slower: every example of the split)", key="ll_full", default=False)
if not tasks:
    st.info("Pick at least one task.")
    st.stop()


def path_plan(n):
    """(coord, grid, path_key, compute(xs, report, stop=None)) of the current choices, scored on `n`
    examples per task (None: the full split). Deltas and the base are read here, in the page's thread.
    `stop`: polled before every forward batch and every module of its forward (a background refinement:
    a new choice stops it within milliseconds, not at the end of a point, which on 64 examples per task
    took 2.7 s of the CPU the next estimate needs)."""
    inputs = merge_inputs(ws, ws.key)

    def evaluate(stop):
        return functools.partial(ws.evaluator.evaluate, split=split, subsample=n, tasks=tasks, stop=stop)
    base = tvs.apply({})
    if path_kind == LINE:
        sa, sb = options[start], options[end]
        da, db = delta_of(ws, sa, inputs), delta_of(ws, sb, inputs)
        return ("lam", lambda_grid(points), ("line", spec_key(sa), spec_key(sb), split, n, tuple(tasks)),
                lambda xs, report, stop=None: delta_path(evaluate(stop), base, da, db, xs, progress=report))
    sd = options[delta_label]
    d = delta_of(ws, sd, inputs)
    return ("alpha", np.linspace(lo, hi, points), ("scale", spec_key(sd), split, n, tuple(tasks)),
            lambda xs, report, stop=None: scaling_path(evaluate(stop), base, d, xs, progress=report))


def point_keys(path_key, grid):
    return [(path_key, round(float(x), 9)) for x in grid]


def remember(coord, path_key, fresh: pd.DataFrame) -> None:
    memo = ws.extras.setdefault("landscape_points", {})
    for x, g in fresh.groupby(coord, sort=False):
        memo[(path_key, round(float(x), 9))] = g
    while len(memo) > 2000:  # bounded: each entry is a few rows
        memo.pop(next(iter(memo)))


def run_path(progress, n, budget_s: float | None = None):
    """Curves for the current choices on `n` examples per task.

    Memoised per point: every evaluated (path, split, subsample, tasks, λ or α)
    is kept in the workspace, so a grid change only evaluates the new points
    (0 and 1 are shared by every λ grid, all of a 5-point grid by the 9-point one).
    With `budget_s` (a first estimate): the grid's ends, then new points in
    `spread_order` one at a time while the next is expected to end within it (at least one,
    `ui.refine.another_fits`), and the curves
    hold the points evaluated so far; without, every new point in one call.
    """
    memo = ws.extras.setdefault("landscape_points", {})
    coord, grid, path_key, compute = path_plan(n)
    keys = point_keys(path_key, grid)
    missing = [float(x) for x, k in zip(grid, keys) if k not in memo]
    done = 0
    if missing and budget_s is None:
        remember(coord, path_key, compute(missing, progress))
        done = len(missing)
    elif missing:
        known = [float(x) for x, k in zip(grid, keys) if k in memo]
        ends = {float(grid[0]), float(grid[-1])}   # the barriers and the figure's span need them whatever the budget
        t0 = time.perf_counter()
        for x in spread_order(known, missing):
            if x not in ends and not another_fits(time.perf_counter() - t0, done, budget_s):
                break
            remember(coord, path_key, compute([x], progress))
            done += 1
    st.session_state["ll_points_evaluated"] = done
    st.session_state["ll_points_left"] = len(missing) - done
    return pd.concat([memo[k] for k in keys if k in memo], ignore_index=True)


def live_curves(progress):
    """(curves, pending): the live subsample's curves, or on a CPU, while points of it are missing, a
    first estimate on FIRST_ESTIMATE examples per task with the missing points evaluated in the
    background by the session's Refiner (pending: its key and computation, started and waited for at
    the end of the run, as on the Merge page)."""
    n = None if full else int(subsample)
    if not needs_estimate(ws.evaluator.device, n):
        return run_path(progress, n), None
    memo = ws.extras.setdefault("landscape_points", {})
    coord, grid, path_key, compute = path_plan(n)
    missing = [float(x) for x, k in zip(grid, point_keys(path_key, grid)) if k not in memo]
    if not missing:
        return run_path(progress, n), None
    key = ("landscape", path_key, tuple(missing))

    def refine_points(stop):
        return coord, path_key, compute(missing, None, stop)

    st.session_state.setdefault("ll_refiner", Refiner()).cancel_unless(key)   # no stale one beside the estimate
    return run_path(progress, FIRST_ESTIMATE, estimate_budget_s()), (key, refine_points)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_barriers(curves):
    return barriers(curves)


bar = st.progress(0.0, text="evaluating…")
t0 = time.perf_counter()
try:
    curves, pending = live_curves(lambda f, m: bar.progress(f, text=f"evaluating {m}"))
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
if pending is not None:
    scope = f"first estimate on {FIRST_ESTIMATE} per task"
refinement_slot = st.empty() if pending is not None else None   # its caption while the refinement runs
left = st.session_state.get("ll_points_left", 0) if pending is not None else 0
st.caption(f"{split} split, {scope}{f' (n ≤ {n_used})' if n_used else ''} · {elapsed:.2f} s for "
           f"{st.session_state['ll_points_evaluated']} new of {curves[path_coord].nunique() + left} points × "
           f"{len(tasks)} tasks" + (f"; {left} more in the background" if left else "") +
           " (evaluated points are kept: moving back costs nothing)")

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


if refinement_slot is not None:
    def land(result):
        coord, path_key, fresh = result
        remember(coord, path_key, fresh)
    wait_for_refinement(st.session_state["ll_refiner"], *pending, refinement_slot, land,
                        f"First estimate on {FIRST_ESTIMATE} examples per task (CPU); evaluating "
                        f"{'the full split' if full else f'{subsample} per task'} in the background…")
