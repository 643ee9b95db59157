"""Figures for comparing latent spaces: similarity by layer (linear CKA,
relative-representation similarity, mean unit correlation) and the relative
latent space aggregation probes. Pure functions: tidy DataFrame -> Figure."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots import PALETTE, apply_theme

MEASURES = ("linear CKA", "relative similarity", "mean unit correlation")


def layer_similarity_figure(df: pd.DataFrame) -> go.Figure:
    """One panel per measure, one line per comparison, layers in order
    (columns comparison, layer, measure, value)."""
    measures = [m for m in MEASURES if m in set(df["measure"])]
    fig = make_subplots(rows=1, cols=len(measures), subplot_titles=measures, shared_yaxes=True,
                        horizontal_spacing=0.05)
    layers = list(dict.fromkeys(df["layer"]))
    for k, (comp, d) in enumerate(df.groupby("comparison", sort=False)):
        for c, m in enumerate(measures):
            dm = d[d["measure"] == m].set_index("layer").reindex(layers)
            fig.add_trace(go.Scatter(x=layers, y=dm["value"], mode="lines+markers", name=str(comp),
                                     legendgroup=str(comp), showlegend=c == 0,
                                     line=dict(color=PALETTE[k % len(PALETTE)], width=3)), row=1, col=c + 1)
    fig.update_yaxes(title_text="similarity to model A", row=1, col=1)
    fig.update_layout(title="Similarity of representations by layer, before and after alignment")
    return apply_theme(fig, height=480)


def aggregation_figure(df: pd.DataFrame, value: str = "accuracy") -> go.Figure:
    """Probe accuracy per space (columns space, model, `value`)."""
    labels = [f"{s} ({m})" if m not in ("all", "mean of pairs") else s for s, m in zip(df["space"], df["model"])]
    colors = {"absolute": PALETTE[0], "relative": PALETTE[1], "aggregated relative": PALETTE[2]}
    fig = go.Figure(go.Bar(x=df[value], y=labels, orientation="h",
                           marker_color=[colors.get(s, PALETTE[3]) for s in df["space"]],
                           text=[f"{v:.3f}" for v in df[value]], textposition="outside"))
    fig.update_layout(title="Probe test accuracy: each model's own space vs the aggregated relative space",
                      xaxis_title="test accuracy", yaxis=dict(autorange="reversed"))
    return apply_theme(fig, height=120 + 40 * len(df))
