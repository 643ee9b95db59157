"""Figures of the Merge page: per-task accuracy bars, delta norms by depth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.plots import PALETTE, REFERENCE_COLORS, apply_theme, data_range

MODEL_LABELS = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned", "merged": "merged"}
MERGED_COLOR = PALETTE[0]


def accuracy_bars(table: pd.DataFrame, normalized: bool = False, title: str | None = None,
                  subtitle: str | None = None) -> go.Figure:
    """Grouped bars per task (and the average): zero-shot, fine-tuned, merged, in %.

    The value axis fits the data (it does not start at 0, so differences of a
    point stay visible); each bar carries its value to one decimal, written
    vertically inside the bar (a label that does not fit is hidden, never overlapped).
    `table`: tidy task, model, accuracy, normalized (analysis.merging.scoring.comparison_table)."""
    column = "normalized" if normalized else "accuracy"
    fig = go.Figure()
    for model in ("zero_shot", "fine_tuned", "merged"):
        part = table[table["model"] == model]
        if not len(part):
            continue
        fig.add_bar(x=part["task"], y=part[column] * 100, name=MODEL_LABELS[model],
                    marker_color=REFERENCE_COLORS.get(model, MERGED_COLOR),
                    texttemplate="%{y:.1f}", textposition="inside", textangle=-90, insidetextanchor="end",
                    hovertemplate="%{x}<br>%{y:.2f} %<extra>" + MODEL_LABELS[model] + "</extra>")
    fig.update_layout(barmode="group", xaxis_title="", bargap=0.18, bargroupgap=0.04,
                      yaxis_title="normalised accuracy (% of fine-tuned)" if normalized else "accuracy (%)")
    fig.update_yaxes(range=data_range(table[column] * 100, ceiling=None if normalized else 100.0, step=5))
    return apply_theme(fig, title=title or ("Normalised accuracy (merged ÷ fine-tuned)" if normalized
                                            else "Accuracy per task"), subtitle=subtitle)


def delta_norms(stats: pd.DataFrame, title: str = "Merged delta against the sum of task vectors") -> go.Figure:
    """‖merged‖ / ‖Σ τ_t‖ per matrix parameter, by depth (delta_stats output)."""
    fig = go.Figure()
    part = stats[stats["kind"] != "vector"] if "kind" in stats else stats
    if "ratio" in part:
        fig.add_scatter(x=part["depth"], y=part["ratio"], mode="markers", text=part["param"],
                        marker=dict(size=11, color=MERGED_COLOR), name="merged ÷ sum",
                        hovertemplate="%{text}<br>depth %{x}<br>ratio %{y:.3f}<extra></extra>")
        fig.update_layout(yaxis_title="norm of the merged delta ÷ norm of the task-vector sum")
        values = part["ratio"].to_numpy(dtype=float)
    else:   # per-task (TSV-C): relative reconstruction error
        for task in dict.fromkeys(part["task"]):
            sub = part[part["task"] == task]
            fig.add_scatter(x=sub["depth"], y=sub["relative_error"], mode="markers", name=task, text=sub["param"],
                            hovertemplate="%{text}<br>depth %{x}<br>error %{y:.3f}<extra></extra>")
        fig.update_layout(yaxis_title="relative error of each task's compressed vector")
        values = part["relative_error"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) and np.ptp(finite) < 1e-3 * max(abs(finite).max(), 1e-12):
        # all (nearly) equal, e.g. task arithmetic's constant α: a 0-based axis, not one spanning 1e-8
        fig.update_yaxes(range=[0, 1.25 * max(abs(finite).max(), 1e-12)], tickformat=".3g")
    fig.update_layout(xaxis_title="block depth (0 = first block)")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig, title=title)
