"""Figures comparing merge configurations (from analysis.report.comparison_table)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from analysis.plots import PALETTE, REFERENCE_COLORS, apply_theme
from analysis.report import METRIC_TITLES

_REF = {"zero-shot": REFERENCE_COLORS["zero_shot"], "fine-tuned": REFERENCE_COLORS["fine_tuned"]}


def config_colors(configs: Sequence[str]) -> dict[str, str]:
    """Reference rows in greys; configurations in palette order (after the task colours' first entries, so
    a configuration is not mistaken for a task on the pages that colour by task)."""
    out, i = {}, 0
    for c in configs:
        if c in _REF:
            out[c] = _REF[c]
        else:
            out[c] = PALETTE[(8 + i) % len(PALETTE)]
            i += 1
    return out


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


def _pct(metric: str) -> float:
    return 100.0  # accuracy, normalised accuracy and NAI are all shown as percentages


def _layout(comparison: pd.DataFrame, metric: str, tasks: Sequence[str] | None):
    """Rows of one metric, the task order (the set's order first), configurations and their colours."""
    sub = comparison[comparison["metric"] == metric]
    order = [t for t in (tasks or []) if t in set(sub["task"])] + [t for t in dict.fromkeys(sub["task"]) if t not in (tasks or [])]
    configs = list(dict.fromkeys(sub["config"]))
    return sub, order, configs, config_colors(configs)


def grouped_bars(comparison: pd.DataFrame, metric: str = "accuracy", tasks: Sequence[str] | None = None,
                 height: int = 560) -> go.Figure:
    """One group per task (plus the mean), one bar per configuration."""
    sub, order, configs, colors = _layout(comparison, metric, tasks)
    fig = go.Figure()
    for config in configs:
        g = sub[sub["config"] == config].set_index("task")["value"].reindex(order)
        x = order + ["mean"]
        y = list(g.values * _pct(metric)) + [float(g.mean()) * _pct(metric)]
        fig.add_trace(go.Bar(x=x, y=y, name=config, marker_color=colors[config],
                             hovertemplate="%{x}: %{y:.1f}<extra>" + config + "</extra>"))
    fig.update_layout(barmode="group", xaxis_title="task", yaxis_title=METRIC_TITLES.get(metric, metric),
                      bargap=0.2, bargroupgap=0.05)
    if metric == "accuracy":
        fig.update_yaxes(range=[0, 100])
    apply_theme(fig, height=height)
    fig.update_layout(title=dict(y=0.97, yref="container"), legend=dict(y=1.02), margin=dict(t=130))
    return fig


def radar(comparison: pd.DataFrame, metric: str = "accuracy", tasks: Sequence[str] | None = None,
          height: int = 620) -> go.Figure:
    """One closed polygon per configuration over the tasks."""
    sub, order, configs, colors = _layout(comparison, metric, tasks)
    fig = go.Figure()
    for config in configs:
        g = sub[sub["config"] == config].set_index("task")["value"].reindex(order) * _pct(metric)
        ref = config in _REF
        fig.add_trace(go.Scatterpolar(r=list(g.values) + [g.values[0]], theta=order + [order[0]], name=config,
                                      mode="lines+markers", line=dict(color=colors[config], width=3,
                                                                      dash="dot" if ref else "solid"),
                                      fill="toself" if ref else None,
                                      fillcolor=_rgba(colors[config], 0.08) if ref else None))
    # the metric goes in the figure title (set by the caller): a radial-axis title collides with its ticks
    fig.update_layout(polar=dict(radialaxis=dict(ticksuffix="%", angle=90, tickangle=90, nticks=5),
                                 angularaxis=dict(direction="clockwise", rotation=90)),
                      title=METRIC_TITLES.get(metric, metric))
    apply_theme(fig, height=height)
    fig.update_layout(title=dict(y=0.97, yref="container"), legend=dict(y=1.12), margin=dict(t=150))
    return fig
