"""Figures comparing merge configurations (from analysis.report.comparison_table)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from analysis.plots import PALETTE, REFERENCE_COLORS, apply_theme, data_range, wrap_label
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


def _range(values, metric: str) -> list[float]:
    """The value axis: fits the data; accuracy stays within 0–100 %, NAI may go below 0."""
    return data_range(values, floor=None if metric == "normalized_accuracy_improvement" else 0.0,
                      ceiling=100.0 if metric == "accuracy" else None, step=5)


def _layout(comparison: pd.DataFrame, metric: str, tasks: Sequence[str] | None):
    """Rows of one metric, the task order (the set's order first), configurations and their colours."""
    sub = comparison[comparison["metric"] == metric]
    order = [t for t in (tasks or []) if t in set(sub["task"])] + [t for t in dict.fromkeys(sub["task"]) if t not in (tasks or [])]
    configs = list(dict.fromkeys(sub["config"]))
    return sub, order, configs, config_colors(configs)


def grouped_bars(comparison: pd.DataFrame, metric: str = "accuracy", tasks: Sequence[str] | None = None,
                 height: int = 560, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """One group per task (plus the mean), one bar per configuration, in %.

    The value axis fits the data (not a fixed 0–100 that flattens differences of a point)."""
    sub, order, configs, colors = _layout(comparison, metric, tasks)
    fig, shown = go.Figure(), []
    for config in configs:
        g = sub[sub["config"] == config].set_index("task")["value"].reindex(order)
        x = order + ["mean"]
        y = list(g.values * _pct(metric)) + [float(g.mean()) * _pct(metric)]
        shown += y
        fig.add_trace(go.Bar(x=x, y=y, name=wrap_label(config), marker_color=colors[config],
                             hovertemplate="%{x}: %{y:.2f} %<extra>" + config + "</extra>"))
    fig.update_layout(barmode="group", xaxis_title="", yaxis_title=METRIC_TITLES.get(metric, metric),
                      bargap=0.2, bargroupgap=0.05)
    fig.update_yaxes(range=_range(shown, metric))
    return apply_theme(fig, height=height, title=title or f"{METRIC_TITLES.get(metric, metric)} per task",
                       subtitle=subtitle)


def radar(comparison: pd.DataFrame, metric: str = "accuracy", tasks: Sequence[str] | None = None,
          height: int = 620, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """One closed polygon per configuration over the tasks, in %; the radial
    axis spans the data (its centre is the lowest value shown, not 0, and says so)."""
    sub, order, configs, colors = _layout(comparison, metric, tasks)
    fig, shown = go.Figure(), []
    for config in configs:
        g = sub[sub["config"] == config].set_index("task")["value"].reindex(order) * _pct(metric)
        shown += list(g.values)
        ref = config in _REF
        fig.add_trace(go.Scatterpolar(r=list(g.values) + [g.values[0]], theta=order + [order[0]],
                                      name=wrap_label(config), mode="lines+markers",
                                      line=dict(color=colors[config], width=3, dash="dot" if ref else "solid"),
                                      fill="toself" if ref else None,
                                      fillcolor=_rgba(colors[config], 0.08) if ref else None,
                                      hovertemplate="%{theta}: %{r:.2f} %<extra>" + config + "</extra>"))
    lo, hi = _range(shown, metric)
    # the metric goes in the title: a radial-axis title collides with its ticks
    # the radial axis runs between the first and the last task, so its tick labels cover no task name
    between = 90 + 180 / max(len(order), 1)
    fig.update_layout(polar=dict(radialaxis=dict(range=[lo, hi], ticksuffix=" %", angle=between, tickangle=between,
                                                 nticks=5, tickfont=dict(size=12, color="#555555")),
                                 angularaxis=dict(direction="clockwise", rotation=90)))
    return apply_theme(fig, height=height, title=title or METRIC_TITLES.get(metric, metric),
                       subtitle=subtitle or f"radial axis from {lo:g} % (centre) to {hi:g} %")
