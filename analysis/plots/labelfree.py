"""Figures of the label-free comparisons (analysis.labelfree): agreement with each fine-tuned
model on unlabelled text, and distance to it block by block."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from analysis.plots import apply_theme

MEASURES = {"prediction_agreement": "prediction agreement", "linear_cka": "linear CKA of features",
            "mean_cosine": "mean cosine of features"}


def agreement_bars(table: pd.DataFrame, title: str = "Merged vs each fine-tuned model on unlabelled text"
                   ) -> go.Figure:
    """Grouped bars per task, in %: prediction agreement (where the task has a head), CKA, cosine."""
    fig = go.Figure()
    shown = []
    for col, label in MEASURES.items():
        values = table[col] * 100
        if values.isna().all():
            continue
        shown += list(values.dropna())
        fig.add_bar(x=table["task"], y=values, name=label, text=[f"{v:.1f}" for v in values],
                    textposition="outside", cliponaxis=False)
    low = min(shown) if shown else 0.0
    fig.update_layout(barmode="group", title=title, xaxis_title="task", yaxis_title="agreement / similarity (%)")
    fig.update_yaxes(range=[max(0.0, low - 0.15 * (100 - low) - 2), 104])  # rescaled to the data, 100 % visible
    return apply_theme(fig)


def layer_distance_figure(layers: pd.DataFrame, title: str = "Distance to each fine-tuned model, block by block"
                          ) -> go.Figure:
    """One line per task: ‖δ − τ_t‖ / ‖τ_t‖ by block (0 = the fine-tuned model, 1 = the base)."""
    fig = go.Figure()
    order = list(dict.fromkeys(str(d) for d in layers["depth"]))
    for task in dict.fromkeys(layers["task"]):
        sub = layers[layers["task"] == task]
        fig.add_scatter(x=[str(d) for d in sub["depth"]], y=sub["relative_distance"], mode="lines+markers",
                        name=task, hovertemplate="block %{x}<br>‖δ − τ‖ ÷ ‖τ‖ = %{y:.3f}<extra>" + task + "</extra>")
    fig.add_hline(y=1.0, line_dash="dot", line_color="#9e9e9e", annotation_text="base model",
                  annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="block (parameters outside blocks: embeddings, pooler, norms)",
                      yaxis_title="‖merged − fine-tuned‖ ÷ ‖task vector‖")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    top = float(layers["relative_distance"].max()) if len(layers) else 1.0
    fig.update_yaxes(range=[0, max(1.1, top * 1.1)])
    return apply_theme(fig)
