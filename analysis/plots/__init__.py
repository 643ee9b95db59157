"""Pure figure builders: tidy DataFrame -> plotly Figure.

This module holds the shared look (template, one colour per task kept the
same on every page, projector-friendly sizes); each area has its own module
(spectra, merge, landscape, alignment).
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import plotly.io as pio

# Colour-blind-safe qualitative palette (Okabe-Ito, then Tol's muted set).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255"]
REFERENCE_COLORS = {"zero_shot": "#9e9e9e", "fine_tuned": "#424242"}
FONT_SIZE = 16

TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.font = dict(size=FONT_SIZE, family="Inter, Helvetica, Arial, sans-serif")
TEMPLATE.layout.colorway = PALETTE
TEMPLATE.layout.title = dict(x=0.0, xanchor="left", font=dict(size=FONT_SIZE + 4))
TEMPLATE.layout.legend = dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0)
TEMPLATE.layout.margin = dict(l=70, r=30, t=90, b=60)
pio.templates["mergescope"] = TEMPLATE


def task_color(task: str, tasks: Sequence[str]) -> str:
    """The colour of a task: fixed by its position in the set's task order, so
    it is the same on every page."""
    if task in REFERENCE_COLORS:
        return REFERENCE_COLORS[task]
    order = list(tasks)
    i = order.index(task) if task in order else len(order) + (sum(map(ord, task)) % len(PALETTE))
    return PALETTE[i % len(PALETTE)]


def task_color_map(tasks: Sequence[str]) -> dict[str, str]:
    return {t: task_color(t, tasks) for t in tasks}


def apply_theme(fig: go.Figure, height: int = 520) -> go.Figure:
    """The mergescope look: template, legend above the plot (never over data)."""
    fig.update_layout(template=TEMPLATE, height=height)
    return fig
