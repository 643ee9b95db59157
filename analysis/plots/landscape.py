"""Figures for paths between parameter sets (tidy path table -> plotly Figure)."""
from __future__ import annotations

import functools
import json
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.barriers import BARRIERS
from analysis.plots import apply_theme, task_color, unvalidated_figure

METRIC_LABELS = {"loss": "cross-entropy loss (nats)", "accuracy": "accuracy (%)"}
COORD_LABELS = {"lam": "λ (0 = start, 1 = end)", "alpha": "α (scale of the merged delta)"}


@functools.lru_cache(maxsize=8)
def _panels_layout(titles: tuple[str, ...]) -> str:
    """make_subplots' layout for one row of panels, as JSON (make_subplots costs ~50 ms a call)."""
    return json.dumps(make_subplots(rows=1, cols=len(titles), horizontal_spacing=0.1,
                                    subplot_titles=list(titles)).layout.to_plotly_json())


def path_figure(curves: pd.DataFrame, tasks: Sequence[str], coord: str = "lam", title: str = "",
                start_label: str = "start", end_label: str = "end", height: int = 560,
                subtitle: str | None = None) -> go.Figure:
    """Loss (left) and accuracy (right) along a path, one line per task, same colour per task on both.

    Built in one go from plain dicts (traces naming their axes, numpy columns, make_subplots'
    layout cached): through make_subplots, go.Scatter and add_trace(row=, col=) this figure
    took ~250 ms with 8 tasks, most of a warm Loss Landscape rerun (py-spy, quick demo)."""
    metrics = [m for m in ("loss", "accuracy") if m in set(curves["metric"])]
    layout = json.loads(_panels_layout(tuple(METRIC_LABELS[m].split(" (")[0] for m in metrics)))
    order = list(tasks)
    traces = []
    for col, metric in enumerate(metrics, start=1):
        suffix = "" if col == 1 else str(col)
        sub = curves[curves["metric"] == metric]
        present = set(sub["task"])
        for task in [t for t in order if t in present] + sorted(present - set(order)):
            g = sub[sub["task"] == task].sort_values(coord)
            y = g["value"].to_numpy() * (100.0 if metric == "accuracy" else 1.0)
            traces.append(dict(type="scatter", x=g[coord].to_numpy(), y=y, mode="lines+markers", name=str(task),
                               legendgroup=str(task), showlegend=(col == 1),
                               line=dict(color=task_color(task, order), width=3), marker=dict(size=8),
                               xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                               hovertemplate=f"{task}<br>{coord}=%{{x:.3g}}<br>{metric}=%{{y:.4g}}<extra></extra>"))
        layout[f"yaxis{suffix}"]["title"] = {"text": METRIC_LABELS[metric]}
        xaxis = layout[f"xaxis{suffix}"]
        xaxis["title"] = {"text": COORD_LABELS.get(coord, coord)}
        if coord == "lam":
            xaxis.update(tickvals=[0, 0.25, 0.5, 0.75, 1.0],
                         ticktext=[f"0<br>{start_label}", "0.25", "0.5", "0.75", f"1<br>{end_label}"])
    for note in layout.get("annotations", []):   # the panel titles, just above each panel: smaller than the title
        note.setdefault("font", {})["size"] = 15
    fig = unvalidated_figure(traces, layout)
    return apply_theme(fig, height=height, title=title or None, subtitle=subtitle)


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
