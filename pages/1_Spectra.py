"""Spectra: each layer's singular spectrum per task, energy kept at a rank
fraction, effective rank, and TSV-C compression (error and accuracy).

Every view reads the cached per-task SVD factors; moving the rank-fraction
slider only re-slices them (derived tables are cached per rank fraction).
Choices live in the URL (sp_* query parameters, ui/url.py); `sp_acc=true`
means the view showed TSV-C accuracy, which a link then evaluates again.
"""
from __future__ import annotations

import streamlit as st

from analysis.plots.spectra import (effective_rank_figure, energy_figure, spectrum_figure,
                                    tsvc_accuracy_figure)
from analysis.spectra import (effective_rank_table, energy_table, singular_values_table, truncation_rank,
                              tsvc_accuracy_table, tsvc_error_table)
from ui import url
from ui.state import (merge_inputs, rank_fraction_slider, reachable_rank_fraction, require_workspace,
                      spectral_cache, start_page)

ENERGY_GRID = [i / 100 for i in range(1, 101)]
QP = st.query_params

start_page("Spectra")
ws = require_workspace()
# the same cache object spectral_cache() fills; the widgets need only its names and ranks, so on a
# set seen for the first time the chosen layer is drawn before every other layer is decomposed
cache = merge_inputs(ws, ws.key).spectra()
tasks = cache.tasks
if not cache.names:
    st.info("This set has no matrix or conv parameters, so there is no spectrum to show.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=8)
def _singular_values(_cache, key: str):
    return singular_values_table(_cache)


@st.cache_data(show_spinner=False, max_entries=8)
def _energy(_cache, key: str):
    return energy_table(_cache, ENERGY_GRID)


@st.cache_data(show_spinner=False, max_entries=8)
def _effective_rank(_cache, key: str):
    return effective_rank_table(_cache)


@st.cache_data(show_spinner=False, max_entries=64)
def _tsvc_errors(_cache, key: str, rank_fraction: float):
    return tsvc_error_table(_cache, rank_fraction)


caption = st.empty()
first_visit = url.first_run("spectra_rank_fraction")   # a fresh session or back from another page
f = rank_fraction_slider(cache, key="spectra_rank_fraction", param="sp_f",
                         help="TSV keeps ⌊f·min(m, n)⌋ singular triplets of each task matrix; 1/T is the TSV-M default.")
hi = reachable_rank_fraction(cache)

layer = url.widget(st.selectbox, "Layer", key="spectra_layer", param="sp_layer", options=cache.names,
                   default=cache.names[0])
c1, c2 = st.columns(2)
with c1:
    spectrum = st.empty()
if not cache.ready:   # this layer's values alone (one batched svdvals), then every factor under the bar
    spectrum.plotly_chart(spectrum_figure(singular_values_table(cache, [layer], first_look=True), layer, tasks),
                          width="stretch")
cache = spectral_cache(ws, ws.key)
methods = sorted({r["method"] for r in cache.report})
caption.caption(f"{ws.name}: {len(tasks)} tasks, {len(cache.names)} matrices decomposed once "
                f"({'read from the disk cache' if not cache.report else 'computed with ' + ', '.join(methods)}"
                f"{''.join(sorted({' as tasks on ' + r['ray'] for r in cache.report if 'ray' in r}))}); "
                "moving the slider re-slices the cached factors, no SVD is recomputed.")
sv = _singular_values(cache, ws.key)
spectrum.plotly_chart(spectrum_figure(sv, layer, tasks), width="stretch", key="spectra_spectrum")
with c2:
    scope = url.widget(st.radio, "Energy curve of", key="spectra_scope", param="sp_scope",
                       options=["this layer", "mean over layers"], default="this layer", horizontal=True)
    energy = _energy(cache, ws.key)
    st.plotly_chart(energy_figure(energy, layer if scope == "this layer" else None, tasks, rank_fraction=f),
                    width="stretch", key="spectra_energy")

st.subheader(f"TSV-C at rank fraction {f:.2f}")
st.caption("Each task matrix truncated to its top ⌊f·k⌋ singular triplets: relative Frobenius error "
           "‖Δ − Δ_r‖_F / ‖Δ‖_F (= √(1 − energy kept), Eckart–Young) and the share of numbers stored, r(m+n+1)/(mn).")
errors = _tsvc_errors(cache, ws.key, float(f))
summary = (100 * errors.groupby("task", sort=False)[["rel_error", "storage"]].mean()).round(2) \
    .reindex(tasks).reset_index().rename(columns={"rel_error": "mean relative error (%)",
                                                  "storage": "mean storage (% of the dense matrix)"})
st.dataframe(summary, hide_index=True, key="spectra_tsvc_summary")
with st.expander("Per layer"):
    st.dataframe(errors, hide_index=True, key="spectra_tsvc_layers")
    st.download_button("Download CSV", errors.to_csv(index=False), file_name="tsvc_errors.csv", key="spectra_dl_tsvc")

st.subheader("Effective rank")
st.caption("exp of the Shannon entropy of p_i = σ_i / Σσ_j (Roy & Vetterli 2007), as a share of min(m, n).")
er = _effective_rank(cache, ws.key)
if er["depth"].notna().any():
    st.plotly_chart(effective_rank_figure(er, tasks), width="stretch", key="spectra_erank")
with st.expander("Table"):
    st.dataframe(er, hide_index=True, key="spectra_erank_table")

st.subheader("TSV-C accuracy")
if ws.evaluator is None:
    st.info("Accuracy needs labelled data and task heads (the built-in demo has them; your own checkpoints do not).")
else:
    eval_tasks = [t for t in tasks if t in set(ws.evaluator.tasks)]
    presets = sorted({f for f in (round(1.0 / len(tasks), 4), 0.1, 0.05, 0.01) if f <= hi}, reverse=True)
    cols = st.columns(3)
    fractions = url.widget(cols[0].multiselect, "Rank fractions", key="spectra_tsvc_fracs", param="sp_fracs",
                           options=presets, default=presets)
    split = url.widget(cols[1].selectbox, "Split", key="spectra_tsvc_split", param="sp_split",
                       options=["validation", "test"], default="test")
    subsample = url.widget(cols[2].number_input, "Subsample (0 = full split)", key="spectra_tsvc_sub", param="sp_sub",
                           default=256, min_value=0, max_value=100_000, step=64)
    settings = (ws.key, tuple(fractions), split, int(subsample))
    stored = st.session_state.get("spectra_tsvc_acc")
    # the button, or a link to a view that showed the accuracy (sp_acc=true): evaluate these settings
    if st.button("Evaluate compressed task models", key="spectra_tsvc_run") or (
            first_visit and QP.get("sp_acc") == "true" and (not stored or stored[0] != settings)):
        bar = st.progress(0.0, text="evaluating…")
        acc = tsvc_accuracy_table(cache, ws.evaluator, fractions, split=split, subsample=int(subsample) or None,
                                  tasks=eval_tasks,
                                  progress=lambda d, t, what: bar.progress(d / t, text=f"evaluated {what}"))
        bar.empty()
        st.session_state["spectra_tsvc_acc"] = stored = (settings, acc)
    if stored and stored[0] == settings:
        acc = stored[1]
        url.set_param("sp_acc", True)
        st.plotly_chart(tsvc_accuracy_figure(acc, tasks), width="stretch", key="spectra_tsvc_fig")
        wide = acc[acc.metric == "accuracy"].pivot_table(index="task", columns="rank_fraction", values="value")
        wide.columns = [f"{100 * c:g} % of the rank" for c in wide.columns]
        st.dataframe((100 * wide.reindex([t for t in tasks if t in wide.index])).round(2),
                     key="spectra_tsvc_acc_table")
        st.caption("Accuracy (%) of each task's own compressed model, by the share of the rank kept.")
    else:
        url.drop("sp_acc")
        if stored and stored[0][0] == ws.key:
            st.caption("The settings changed since the last evaluation: press the button to evaluate these.")

r_example = truncation_rank(cache.singular_values(layer).shape[-1], float(f))
st.caption(f"At f = {f:.2f}, layer {layer} keeps rank {r_example} per task.")
