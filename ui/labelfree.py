"""The Merge page's view for a set without labelled data: how close the merged model stays to each
fine-tuned model, on unlabelled text (when attached) and block by block in weight space
(analysis.labelfree). Each configuration looked at is added to the merge history with these
numbers, so the Report page lists it and can export its merged model."""
from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from analysis.labelfree import compare_on_text, layer_distances, overall_distance
from analysis.plots.labelfree import agreement_bars, layer_distance_figure

HISTORY_KEY = "merge_history"
LABEL_FREE_SPLIT = "label-free"


@st.cache_data(max_entries=32, show_spinner="Running the merged and fine-tuned models on your text…")
def _on_text(_ws, _delta, ws_key: str, method: str, knobs_json: str) -> pd.DataFrame:
    return compare_on_text(_ws.extras["labelfree"], _ws.tvs, _delta)


@st.cache_data(max_entries=32, show_spinner="Comparing weights block by block…")
def _layers(_ws, _delta, ws_key: str, method: str, knobs_json: str) -> pd.DataFrame:
    return layer_distances(_ws.tvs, _delta)


def label_free_view(ws, delta, method: str, knobs: dict) -> None:
    """Figures and tables of the label-free comparisons, and one history row per configuration."""
    knobs_json = json.dumps(knobs, sort_keys=True)
    probe = ws.extras.get("labelfree")
    st.info("No labelled data for this set, so accuracy cannot be measured. Shown instead: how close the merged "
            "model stays to each fine-tuned model" + (" on your unlabelled text and" if probe is not None else "") +
            " block by block in weight space.")
    summary: dict[str, dict] = {}
    if probe is not None:
        table = _on_text(ws, delta, ws.key, method, knobs_json)
        st.plotly_chart(agreement_bars(table), width="stretch", key="merge_lf_agreement")
        st.caption("**Prediction agreement**: share of texts where the merged model and the task's fine-tuned model "
                   "predict the same class with the task's head (from its checkpoint). **Linear CKA** "
                   "(Kornblith et al., 2019) and **mean cosine** compare their pooled features text by text; "
                   "100 % = identical up to rotation and scale (CKA) or direction (cosine).")
        st.dataframe(table.style.format({c: "{:.1%}" for c in ("prediction_agreement", "linear_cka", "mean_cosine")},
                                        na_rep="– (no head)"), hide_index=True, width="stretch", key="merge_lf_table")
        for r in table.itertuples():
            summary[r.task] = {"prediction agreement": r.prediction_agreement, "linear CKA": r.linear_cka}
    else:
        st.caption("Attach unlabelled text on **Home** (a CSV or JSONL with a `text` column, for Hugging Face "
                   "folders) to compare predictions and representations as well.")
    layers = _layers(ws, delta, ws.key, method, knobs_json)
    st.plotly_chart(layer_distance_figure(layers), width="stretch", key="merge_lf_layers")
    overall = overall_distance(layers)
    st.caption("‖merged − fine-tuned‖ ÷ ‖task vector‖ per block: 0 = the merge keeps the fine-tuned weights "
               "there, 1 = as far from them as the base. Over all parameters: " +
               ", ".join(f"{t} {v:.3f}" for t, v in overall.items()) + ".")
    with st.expander("Per-block table"):
        st.dataframe(layers, hide_index=True, width="stretch", key="merge_lf_layer_table")
    for t, v in overall.items():
        summary.setdefault(t, {})["relative distance"] = float(v)
    _record(method, knobs, summary)
    history = [h for h in st.session_state.get(HISTORY_KEY, []) if h.get("label_free")]
    if history:
        st.subheader("Configurations looked at in this session")
        st.dataframe(history_table(history), hide_index=True, width="stretch", key="merge_lf_history")


def _record(method: str, knobs: dict, summary: dict) -> None:
    history = st.session_state.setdefault(HISTORY_KEY, [])
    if any(h.get("method") == method and h.get("knobs") == knobs and h.get("split") == LABEL_FREE_SPLIT
           for h in history):
        return
    history.append({"method": method, "knobs": knobs, "split": LABEL_FREE_SPLIT, "subsample": None,
                    "per_task": {}, "mean": math.nan, "label_free": summary})


def history_table(history) -> pd.DataFrame:
    """One row per label-free configuration: method, knobs, and each measure's mean over tasks."""
    rows = []
    for i, h in enumerate(history, 1):
        row = {"#": i, "method": h["method"], "knobs": ", ".join(f"{k}={v}" for k, v in h.get("knobs", {}).items())}
        per_task = pd.DataFrame(h["label_free"]).T
        for col in per_task.columns:
            row[f"mean {col}"] = float(per_task[col].mean())
        rows.append(row)
    return pd.DataFrame(rows)
