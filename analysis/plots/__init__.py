"""Pure figure builders: tidy DataFrame -> plotly Figure.

This module holds the one look every figure shares, in the app and in the
exported PNG/SVG/HTML alike (`apply_theme`): the "mergescope" template, one
colour per task kept the same on every page, a title with its own top margin,
and the legend outside the plotting area, at the right, where it can cover
neither the title nor the data. Helpers for axes that rescale to the data
(`data_range`), legend labels that wrap (`wrap_label`) and task orders by
hierarchical clustering (`cluster_order`) live here too; each area has its own
module (spectra, merge, landscape, report, alignment, curvature).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

# Colour-blind-safe qualitative palette (Okabe-Ito, then Tol's muted set).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255"]
REFERENCE_COLORS = {"zero_shot": "#9e9e9e", "fine_tuned": "#424242"}
FONT_SIZE = 15
FONT_FAMILY = "Inter, Helvetica, Arial, sans-serif"
# Print resolution for exports: a 1400-px-wide figure at scale 3 is 4200 px, 300 dpi at 14 inches.
EXPORT_SCALE = 3

TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.font = dict(size=FONT_SIZE, family=FONT_FAMILY, color="#222222")
TEMPLATE.layout.colorway = PALETTE
# The title sits in the container's top margin and pushes the plot down (automargin), so a title
# never runs into the plot; the legend lives outside the plot at the right and pushes the right margin.
TEMPLATE.layout.title = dict(x=0.0, xanchor="left", xref="container", y=1.0, yanchor="top", yref="container",
                             pad=dict(t=14, l=14), automargin=True, font=dict(size=FONT_SIZE + 3))
TEMPLATE.layout.legend = dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top",
                              bgcolor="rgba(255,255,255,0)", font=dict(size=FONT_SIZE - 1), tracegroupgap=4)
TEMPLATE.layout.margin = dict(l=70, r=20, t=40, b=60)
TEMPLATE.layout.uniformtext = dict(minsize=10, mode="hide")   # a bar label that does not fit is hidden, not overlapped
TEMPLATE.layout.hoverlabel = dict(font=dict(size=FONT_SIZE - 1))
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


def _set_template(fig: go.Figure) -> None:
    """fig.layout.template = TEMPLATE without plotly re-validating the whole
    template (every trace type's defaults): TEMPLATE was validated when built,
    and re-validating took ~20 ms per figure, 40 % of an Interference rerun
    (py-spy, quick demo). Plotly applies its default template the same way
    (BaseFigure._initialize_layout_template); the stored value is a deep copy."""
    layout = fig.layout
    validate = layout._validate
    layout._validate = False
    try:
        layout.template = TEMPLATE
    finally:
        layout._validate = validate


def unvalidated_figure(data: list[dict], layout: dict) -> go.Figure:
    """go.Figure(data, layout) without plotly checking every property on the way in
    (its checks cost ~2 ms per trace; a path figure has 16); later updates are
    checked as usual. For dicts this module's builders write themselves: tests
    compare each against the checked construction (tests/test_plots_theme.py)."""
    fig = go.Figure(data=data, layout=layout, _validate=False)
    fig._validate = fig.layout._validate = True
    for trace in fig.data:
        trace._validate = True
    return fig


PANEL_TITLE_ROOM_PX = 30
_TITLE_BLOCK_PX = 14 + 2 * (FONT_SIZE + 3)   # the template's title pad.t and one line of its font
_SUBTITLE_PX = 2 * FONT_SIZE


def _above_the_panels(note) -> bool:
    return note.yref == "paper" and note.y is not None and note.y >= 1.0 and note.yanchor == "bottom"


def apply_theme(fig: go.Figure, height: int = 520, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """The mergescope look: template, height, and (optionally) a title with a
    subtitle beneath it; any legend-position overrides a figure had are reset
    to the template's (right, outside the plot), so no legend covers a title."""
    _set_template(fig)
    fig.update_layout(height=height)
    if title is not None:
        fig.update_layout(title_text=title)
    if subtitle:
        fig.update_layout(title_subtitle_text=subtitle, title_subtitle_font=dict(size=FONT_SIZE - 1, color="#555555"))
    fig.layout.legend = None      # the template's legend, whatever a builder set before
    fig.layout.margin = None
    if title is not None and any(_above_the_panels(note) for note in fig.layout.annotations):
        # panel titles (make_subplots) sit in the margin just above the plot, where the title's automargin
        # does not count them, so a subtitle ran into them. A fixed top margin holds title, subtitle and
        # panel titles (the title's own pad.b, with automargin, left the traces drawn on stale axes)
        fig.update_layout(title_automargin=False,
                          margin_t=_TITLE_BLOCK_PX + (_SUBTITLE_PX if subtitle else 0) + PANEL_TITLE_ROOM_PX)
    return fig


def data_range(values: Iterable[float], pad: float = 0.1, floor: float | None = 0.0,
               ceiling: float | None = None, step: float = 5.0) -> list[float]:
    """An axis range that fits the data instead of a fixed 0–100: the span of
    `values` widened by `pad` of itself (at least one `step`) on each side,
    rounded out to multiples of `step`, clipped to [floor, ceiling]."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return [floor if floor is not None else 0.0, ceiling if ceiling is not None else 1.0]
    lo, hi = float(v.min()), float(v.max())
    margin = max(pad * (hi - lo), step)
    lo, hi = math.floor((lo - margin) / step) * step, math.ceil((hi + margin) / step) * step
    if floor is not None:
        lo = max(lo, floor)
    if ceiling is not None:
        hi = min(hi, ceiling)
    return [lo, hi]


def wrap_label(text: str, width: int = 36) -> str:
    """A long legend label broken at spaces into lines of about `width` characters (plotly's <br>)."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "<br>".join(lines)


def cluster_order(rows: np.ndarray) -> list[int]:
    """Row order by hierarchical clustering: average linkage on the Euclidean
    distances between the rows' profiles (NaN filled with the row's mean),
    leaves in the optimal order (Bar-Joseph et al. 2001), so rows with similar
    profiles sit together. Fewer than 3 rows keep their order."""
    x = np.asarray(rows, dtype=float)
    n = x.shape[0]
    if n < 3:
        return list(range(n))
    means = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=1, keepdims=True)
    means = np.where(np.isfinite(means), means, 0.0)
    x = np.where(np.isfinite(x), x, means)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import pdist
    d = pdist(x, "euclidean")
    if not np.any(d > 0):
        return list(range(n))
    return [int(i) for i in leaves_list(linkage(d, "average", optimal_ordering=True))]
