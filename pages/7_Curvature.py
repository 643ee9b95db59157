"""Curvature: where the tasks' loss landscapes differ, and what EpiMer does about it.

Per-layer Fisher mass of every task, EpiMer's diagnostics by depth (the two
terms of its error bound, curvature heterogeneity, the gain over the flat
mean) and the layers where the curvature-aware merge departs most from task
arithmetic. Statistics come from the workspace's MergeInputs (computed once,
cached on disk, with a progress bar); without labelled data only the
identity-metric diagnostics are offered.

URL: `?cv_metric=fisher&cv_rank=0&cv_n=256` restores the view.
"""
from __future__ import annotations

import streamlit as st

from analysis.errors import MergescopeError
from analysis.merging.epimer import METRICS, diagnostics_wide, epimer_diagnostics, fisher_mass_table, load_statistics
from analysis.plots.curvature import (departure_bars, diagnostic_depth_figure, error_terms_figure, fisher_mass_figure,
                                      top_departures)
from ui import url
from ui.state import merge_inputs, require_workspace, start_page, with_progress

start_page("Curvature", "Curvature and EpiMer")
ws = require_workspace()
tvs = ws.tvs
has_data = merge_inputs(ws, ws.key).has_data
N_OPTIONS = [64, 128, 256, 512, 1024]
RANKS = list(range(0, 9))   # EpiMer's declared `rank` knob: 0 … 8


@st.cache_data(show_spinner=False, max_entries=32)
def diagnostics(_ws, key: str, metric: str, rank: int, n: int):
    return epimer_diagnostics(merge_inputs(_ws, key), metric=metric, rank=rank, n_examples=n)


@st.cache_data(show_spinner=False, max_entries=8)
def fisher_mass(_ws, key: str, n: int):
    return fisher_mass_table(_ws.tvs, load_statistics(merge_inputs(_ws, key), "fisher", n))


st.caption("EpiMer merges the task vectors as a Fréchet mean under each task's curvature H_t (diagonal Fisher or "
           "K-FAC input Gram), in closed form inside the subspace the task vectors span; merged delta = α·T·B c*. "
           "With the identity metric it is exactly task arithmetic. Details: `analysis/merging/epimer.py`.")
if not has_data:
    st.info("No labelled data for this workspace (your own checkpoints have no task heads or datasets), so no Fisher "
            "or activation statistics exist. Only the identity-metric diagnostics are shown: the Fréchet variance "
            "and residual energy of the flat subspace mean. Curvature heterogeneity needs data (the demo has it).")
metrics = list(METRICS) if has_data else ["identity"]
c1, c2, c3 = st.columns(3)
metric = url.widget(c1.selectbox, "Metric H_t", key="cv_metric", options=metrics, default=metrics[0],
                    help="fisher: diagonal empirical Fisher; kfac_input: input Gram of each linear layer (identity "
                         "elsewhere); identity: flat (= task arithmetic)")
rank = url.widget(c2.select_slider, "Subspace rank (0 = the task vectors' span)", key="cv_rank", options=RANKS,
                  default=0, help="r > 0: the span of each task's top-r singular directions (k ≤ T·r)")
n = url.widget(c3.select_slider, "Examples per task (statistics)", key="cv_n", options=N_OPTIONS, default=256,
               disabled=metric == "identity")

inputs = merge_inputs(ws, ws.key)
try:
    with with_progress(inputs, "Curvature statistics (once per set, cached on disk)"):
        mass = fisher_mass(ws, ws.key, int(n)) if has_data else None
        table = diagnostics(ws, ws.key, metric, int(rank), int(n))
except MergescopeError as exc:
    st.error(str(exc))
    st.stop()

# ------------------------------------------------------------------ Fisher mass
st.header("Fisher mass by depth")
if mass is None:
    st.caption("Needs labelled data: not available for this workspace.")
else:
    st.caption("Σ of each task's diagonal empirical Fisher per layer, divided by the task's total over the model, "
               f"on {n} training examples per task: where each task's loss is sensitive.")
    st.plotly_chart(fisher_mass_figure(mass, tvs.tasks), width="stretch", key="cv_mass_figure")
    outside = mass[mass["depth"].isna()].groupby("task")["share"].sum()
    if len(outside):
        st.caption("Outside the numbered blocks: " + ", ".join(f"{t} {100 * v:.1f} %" for t, v in outside.items()))
    with st.expander("Per layer"):
        st.dataframe(mass, hide_index=True, key="cv_mass_table")

# ------------------------------------------------------------------ diagnostics
st.header("EpiMer diagnostics")
if not len(table):
    st.info("No matrix or conv parameters: EpiMer's subspace diagnostics need matrices.")
    st.stop()
st.caption("Per matrix layer, for the Fréchet mean itself (before α·T). Its error bound: the quadratic-model loss "
           "½Σ_t‖Bc* − τ_t‖²_{H_t} ≤ V + R, with V the subspace Fréchet variance and R the task vectors' energy "
           "outside the subspace (0 for rank 0, whose subspace holds every task vector).")
st.plotly_chart(error_terms_figure(table), width="stretch", key="cv_error_terms")
if metric == "identity":
    st.caption("Identity metric: EpiMer is the flat subspace mean, so heterogeneity, departure from the flat mean "
               "and predicted gain are 0 by construction.")
c1, c2 = st.columns(2)
c1.plotly_chart(diagnostic_depth_figure(table, "heterogeneity"), width="stretch", key="cv_heterogeneity")
c2.plotly_chart(diagnostic_depth_figure(table, "predicted_gain"), width="stretch", key="cv_gain")
st.caption("Heterogeneity: dispersion of the trace-normalised projected metrics BᵀH_tB across tasks (0 when every "
           "H_t is a multiple of one H). Predicted gain: share of the quadratic-model loss the curvature-aware mean "
           "removes against the flat subspace mean. Both say where curvature-aware merging should beat averaging.")
wide = diagnostics_wide(table)
with st.expander("All diagnostics per layer"):
    st.dataframe(wide, hide_index=True, key="cv_diagnostics_table")
    st.download_button("Download (CSV)", wide.to_csv(index=False), file_name=f"epimer_diagnostics_{metric}.csv",
                       key="cv_download")

# ------------------------------------------------------------------ departure from task arithmetic
st.header("Where EpiMer departs from task arithmetic")
st.caption("‖δ_EpiMer − δ_TA‖ / ‖δ_TA‖ per layer at the same α (α cancels).")
c1, c2 = st.columns(2)
c1.plotly_chart(diagnostic_depth_figure(table, "ta_departure"), width="stretch", key="cv_departure_depth")
c2.plotly_chart(departure_bars(table), width="stretch", key="cv_departure_bars")
st.dataframe(top_departures(table), hide_index=True, key="cv_departure_table")
