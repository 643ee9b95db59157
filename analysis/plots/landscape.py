"""Figures for paths between parameter sets (tidy path table -> plotly Figure)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.barriers import BARRIERS
from analysis.plots import apply_theme, task_color

METRIC_LABELS = {"loss": "cross-entropy loss (nats)", "accuracy": "accuracy (%)"}
COORD_LABELS = {"lam": "λ (0 = start, 1 = end)", "alpha": "α (scale of the merged delta)"}


def path_figure(curves: pd.DataFrame, tasks: Sequence[str], coord: str = "lam", title: str = "",
                start_label: str = "start", end_label: str = "end", height: int = 560,
                subtitle: str | None = None) -> go.Figure:
    """Loss (left) and accuracy (right) along a path, one line per task, same colour per task on both."""
    metrics = [m for m in ("loss", "accuracy") if m in set(curves["metric"])]
    fig = make_subplots(rows=1, cols=len(metrics), horizontal_spacing=0.1,
                        subplot_titles=[METRIC_LABELS[m].split(" (")[0] for m in metrics])
    order = list(tasks)
    for col, metric in enumerate(metrics, start=1):
        sub = curves[curves["metric"] == metric]
        for task in [t for t in order if t in set(sub["task"])] + sorted(set(sub["task"]) - set(order)):
            g = sub[sub["task"] == task].sort_values(coord)
            y = g["value"] * (100.0 if metric == "accuracy" else 1.0)
            fig.add_trace(go.Scatter(x=g[coord], y=y, mode="lines+markers", name=task, legendgroup=task,
                                     showlegend=(col == 1), line=dict(color=task_color(task, order), width=3),
                                     marker=dict(size=8),
                                     hovertemplate=f"{task}<br>{coord}=%{{x:.3g}}<br>{metric}=%{{y:.4g}}<extra></extra>"),
                          row=1, col=col)
        fig.update_yaxes(title_text=METRIC_LABELS[metric], row=1, col=col)
        fig.update_xaxes(title_text=COORD_LABELS.get(coord, coord), row=1, col=col)
    if coord == "lam":
        for col in range(1, len(metrics) + 1):
            fig.update_xaxes(tickvals=[0, 0.25, 0.5, 0.75, 1.0],
                             ticktext=[f"0<br>{start_label}", "0.25", "0.5", "0.75", f"1<br>{end_label}"],
                             row=1, col=col)
    apply_theme(fig, height=height, title=title or None, subtitle=subtitle)
    # the two panel titles are annotations just above each panel: smaller than the figure title
    fig.update_annotations(font_size=15)
    return fig


def barrier_figure(barrier_df: pd.DataFrame, tasks: Sequence[str], metric: str = "loss", height: int = 460) -> go.Figure:
    """Grouped bars: both barrier definitions (analysis.barriers) per task; accuracy in points."""
    sub = barrier_df[barrier_df["metric"] == metric]
    scale = 100.0 if metric == "accuracy" else 1.0
    fig = go.Figure()
    patterns = {"path": "", "midpoint": "/"}
    for definition, g in sub.groupby("definition", sort=False):
        label = BARRIERS[definition].label if definition in BARRIERS else definition
        fig.add_trace(go.Bar(x=g["task"], y=g["value"] * scale, name=label,
                             marker=dict(color=[task_color(t, tasks) for t in g["task"]],
                                         pattern=dict(shape=patterns.get(definition, ""))),
                             hovertemplate="%{x}: %{y:.4g}<extra>" + label + "</extra>"))
    unit = "accuracy points" if metric == "accuracy" else METRIC_LABELS[metric]
    fig.update_layout(barmode="group", yaxis_title=f"barrier ({unit})", xaxis_title="")
    return apply_theme(fig, height=height, title=f"Barriers of the {metric} along the path")
