"""Interference: where tasks fight, by layer and by task pair.

Singular Task Interference (from the cached per-task SVD factors, re-sliced at
the slider's rank fraction), cosine similarity, sign conflicts and the
subspace alignment ratio. No SVD is recomputed when the slider moves.
Choices live in the URL (if_* query parameters, ui/url.py).
"""
from __future__ import annotations

import streamlit as st

from analysis.interference import (cosine_table, sar_by, sign_conflict_table, sti_tables, subspace_alignment_table,
                                   task_pair_stats)
from analysis.plots.spectra import pair_depth_heatmap, sar_depth_figure, sti_depth_figure, task_heatmap
from ui import url
from ui.state import rank_fraction_slider, require_workspace, spectral_cache, start_page

start_page("Interference")
ws = require_workspace()
cache = spectral_cache(ws, ws.key)
tvs = ws.tvs
tasks = cache.tasks
WHOLE = "whole model"


@st.cache_data(show_spinner="Singular Task Interference from cached factors…", max_entries=64)
def _sti(_cache, key: str, rank_fraction: float):
    return sti_tables(_cache.tvs, rank_fraction, cache=_cache)


@st.cache_data(show_spinner="Reading task vectors once for cosine and sign statistics…", max_entries=16)
def _pair_stats(_ws, key: str, density: float):
    return task_pair_stats(_ws.tvs, density=density)


@st.cache_data(show_spinner="Subspace alignment (one SVD of each layer's task sum, cached)…", max_entries=16)
def _sar(_cache, key: str, energy: float):
    return subspace_alignment_table(_cache.tvs, cache=_cache, energy=energy)


if len(tasks) < 2:
    st.info("Interference needs at least two tasks; this set has one.")
    st.stop()

st.caption(f"{ws.name}: {len(tasks)} tasks, {len(cache.names)} matrices. STI reads the cached SVD factors: "
           "moving the slider never recomputes an SVD.")
f = rank_fraction_slider(cache, key="interference_rank_fraction", param="if_f",
                         help="Each task's SVD is truncated to ⌊f·min(m, n)⌋ triplets before the concatenation.")

# ------------------------------------------------------------------ STI
st.header("Singular Task Interference")
st.caption("STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁ over U = [U₁…U_T], Σ = blockdiag(Σ₁…Σ_T), V = [V₁…V_T] "
           "(TSV, arXiv 2412.00081). 0 when the tasks' singular subspaces are mutually orthogonal.")
sti, pairs = _sti(cache, ws.key, float(f))
if cache.names:
    c1, c2 = st.columns(2)
    with c1:
        if sti["depth"].notna().any():
            st.plotly_chart(sti_depth_figure(sti), width="stretch", key="interference_sti_depth")
        st.dataframe(sti, hide_index=True, key="interference_sti_table")
        st.download_button("Download STI (CSV)", sti.to_csv(index=False), file_name="sti.csv", key="interference_dl_sti")
    with c2:
        whole = pairs.groupby(["task", "task_b"], sort=False)["sti"].sum().reset_index()
        st.plotly_chart(task_heatmap(whole, "sti", tasks, title="Pairwise STI, summed over layers"),
                        width="stretch", key="interference_sti_pairs")
else:
    st.info("No matrix parameters: STI needs matrices.")

# ------------------------------------------------------------------ cosine and sign conflicts
st.header("Cosine similarity and sign conflicts")
c1, c2 = st.columns(2)
density = url.widget(c1.select_slider, "Sign conflicts after keeping each task's top entries (TIES trim)",
                     key="interference_density", param="if_density", options=[0.05, 0.1, 0.2, 0.5, 1.0], default=1.0,
                     help="1.0 counts every entry; 0.2 keeps each task's top 20 % by magnitude first, as TIES does.")
scope_options = [WHOLE] + [f"block {int(d)}" for d in sorted({d for d in (tvs.depth(n) for n in tvs.param_names)
                                                                 if d is not None})] + list(tvs.param_names)
scope = url.widget(c2.selectbox, "Scope", key="interference_scope", param="if_scope", options=scope_options,
                   default=WHOLE)
stats = _pair_stats(ws, ws.key, float(density))
if scope == WHOLE:
    cos, conf = cosine_table(stats, "model"), sign_conflict_table(stats, "model")
elif scope.startswith("block "):
    d = int(scope.split()[1])
    cos, conf = cosine_table(stats, "depth"), sign_conflict_table(stats, "depth")
    cos, conf = cos[cos["depth"] == d], conf[conf["depth"] == d]
else:
    cos, conf = cosine_table(stats, "param"), sign_conflict_table(stats, "param")
    cos, conf = cos[cos["param"] == scope], conf[conf["param"] == scope]
c1, c2 = st.columns(2)
c1.plotly_chart(task_heatmap(cos, "cosine", tasks, title=f"Cosine similarity — {scope}"),
                width="stretch", key="interference_cos")
c2.plotly_chart(task_heatmap(conf, "conflict_rate", tasks, title=f"Sign-conflict rate — {scope}"),
                width="stretch", key="interference_conf")

# ------------------------------------------------------------------ by block and task pair
# One pair × block heatmap at a time: each is a row per task pair (28 rows at T = 8), so
# showing all three stacked made the page ~5 000 px tall.
st.header("By block and task pair")
STI_BY_BLOCK = "singular task interference"
by_layer = url.widget(st.radio, "By block", key="interference_by_layer", param="if_by_layer",
                      options=[STI_BY_BLOCK, "cosine similarity", "sign-conflict rate"], default=STI_BY_BLOCK,
                      horizontal=True, help="STI follows the rank-fraction slider; cosine and sign conflicts follow "
                                            "the TIES-trim setting above.")
if by_layer == STI_BY_BLOCK:
    if cache.names and pairs["depth"].notna().any():
        st.plotly_chart(pair_depth_heatmap(pairs, "sti", tasks, title="Pairwise STI by block"), width="stretch",
                        key="interference_sti_layers")
    else:
        st.info("No matrix parameters in numbered blocks: STI by block needs them.")
elif by_layer == "cosine similarity":
    st.plotly_chart(pair_depth_heatmap(cosine_table(stats, "depth"), "cosine", tasks, title="Cosine similarity by block"),
                    width="stretch", key="interference_cos_layers")
else:
    st.plotly_chart(pair_depth_heatmap(sign_conflict_table(stats, "depth"), "conflict_rate", tasks,
                                       title="Sign-conflict rate by block"),
                    width="stretch", key="interference_conf_layers")

# ------------------------------------------------------------------ SAR
st.header("Subspace alignment ratio")
st.caption("SAR_t = ‖Π τ_t‖_F / ‖τ_t‖_F, Π the projection onto the top left singular vectors of the summed matrix "
           "Σ_t τ_t that hold the chosen share of its energy (Iso-C / Iso-CTS paper). 1: the task lives inside the "
           "merged subspace; 0: it is left out.")
energy = url.widget(st.select_slider, "Energy held by the summed matrix's subspace", key="interference_sar_energy",
                    param="if_energy", options=[0.8, 0.9, 0.95, 0.99], default=0.95)
if cache.names:
    sar = _sar(cache, ws.key, float(energy))
    c1, c2 = st.columns(2)
    depth_sar = sar_by(sar, "depth")
    if len(depth_sar):
        c1.plotly_chart(sar_depth_figure(depth_sar, tasks), width="stretch", key="interference_sar_depth")
    c2.dataframe(sar_by(sar, "model")[["task", "sar"]], hide_index=True, key="interference_sar_model")
    with st.expander("Per layer"):
        st.dataframe(sar, hide_index=True, key="interference_sar_table")
