"""Figures for permutation alignment: interpolation curves and the 2-D loss
plane through three models. Pure functions: tidy DataFrame -> plotly Figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots import PALETTE, apply_theme

METRIC_LABEL = {"loss": "cross-entropy loss (nats)", "accuracy": "accuracy (%)"}
SCALE = {"accuracy": 100.0}   # accuracy is shown in %, as on every page


def interpolation_figure(curves: pd.DataFrame, metric: str = "loss", title: str | None = None) -> go.Figure:
    """One line per `method` of `metric` along lam (columns lam, metric, value, method)."""
    c = curves[curves["metric"] == metric]
    fig = go.Figure()
    for k, (method, d) in enumerate(c.groupby("method", sort=False)):
        d = d.sort_values("lam")
        fig.add_trace(go.Scatter(x=d["lam"], y=d["value"] * SCALE.get(metric, 1.0), mode="lines+markers",
                                 name=str(method), line=dict(color=PALETTE[k % len(PALETTE)], width=3)))
    fig.update_layout(xaxis_title="λ (0 = model A, 1 = model B)", yaxis_title=METRIC_LABEL.get(metric, metric))
    what = METRIC_LABEL.get(metric, metric).split(" (")[0]
    return apply_theme(fig, title=title or f"Test {what} along the path A → B")


def plane_figure(planes: dict[str, tuple[pd.DataFrame, pd.DataFrame]], metric: str = "loss",
                 log_scale: bool = True) -> go.Figure:
    """Side-by-side contours of `metric` on the plane through three models, one
    panel per label (e.g. naive / aligned); each value is (grid, points) from
    analysis.permutation.loss_plane. One shared colour scale across panels."""
    labels = list(planes)
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, horizontal_spacing=0.08)
    grids = {lab: g[g["metric"] == metric] for lab, (g, _) in planes.items()}
    vals = np.concatenate([g["value"].to_numpy() for g in grids.values()])
    is_log = log_scale and metric == "loss"
    tr = (lambda v: np.log10(np.maximum(v, 1e-6))) if is_log else (lambda v: v * SCALE.get(metric, 1.0))
    lo, hi = float(np.min(tr(vals))), float(np.quantile(tr(vals), 0.95))
    for k, lab in enumerate(labels):
        g = grids[lab]
        xs, ys = np.sort(g["x"].unique()), np.sort(g["y"].unique())
        z = g.pivot(index="y", columns="x", values="value").reindex(index=ys, columns=xs).to_numpy()
        bar_title = f"log₁₀ {metric}" if is_log else METRIC_LABEL.get(metric, metric)
        fig.add_trace(go.Contour(x=xs, y=ys, z=tr(z), zmin=lo, zmax=hi, colorscale="Viridis",
                                 reversescale=metric == "accuracy", showscale=k == len(labels) - 1,
                                 colorbar=dict(title=bar_title), contours=dict(coloring="heatmap"),
                                 hovertemplate="x=%{x:.2f}<br>y=%{y:.2f}<br>" + metric + "=%{z:.3f}<extra></extra>"),
                      row=1, col=k + 1)
        pts = planes[lab][1]
        fig.add_trace(go.Scatter(x=pts["x"], y=pts["y"], mode="markers+text", text=pts["model"],
                                 textposition="top center", marker=dict(color="white", size=12,
                                                                        line=dict(color="black", width=2)),
                                 textfont=dict(color="white", size=16), showlegend=False), row=1, col=k + 1)
        fig.update_xaxes(title_text="distance along B − A", row=1, col=k + 1)
    fig.update_yaxes(title_text="distance along C − A (orthogonal part)", row=1, col=1)
    what = METRIC_LABEL.get(metric, metric).split(" (")[0]
    return apply_theme(fig, height=560, title=f"Test {what} on the plane through three models")
