"""Figures of the Merge page: per-task accuracy bars, delta norms by depth."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from analysis.plots import PALETTE, REFERENCE_COLORS, apply_theme

MODEL_LABELS = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned", "merged": "merged"}
MERGED_COLOR = PALETTE[0]


def accuracy_bars(table: pd.DataFrame, normalized: bool = False, title: str | None = None) -> go.Figure:
    """Grouped bars per task (and the average): zero-shot, fine-tuned, merged.

    `table`: tidy task, model, accuracy, normalized (analysis.merging.scoring.comparison_table)."""
    column = "normalized" if normalized else "accuracy"
    fig = go.Figure()
    for model in ("zero_shot", "fine_tuned", "merged"):
        part = table[table["model"] == model]
        if not len(part):
            continue
        values = part[column] * 100
        fig.add_bar(x=part["task"], y=values, name=MODEL_LABELS[model],
                    marker_color=REFERENCE_COLORS.get(model, MERGED_COLOR),
                    text=[f"{v:.1f}" for v in values], textposition="outside")
    fig.update_layout(barmode="group", title=title or ("Normalised accuracy (merged ÷ fine-tuned)" if normalized
                                                       else "Accuracy per task"),
                      xaxis_title="task", yaxis_title="normalised accuracy (%)" if normalized else "accuracy (%)")
    top = float((table[column] * 100).max()) if len(table) else 100.0
    fig.update_yaxes(range=[0, max(105.0, top * 1.08)])
    return apply_theme(fig)


def delta_norms(stats: pd.DataFrame, title: str = "Merged delta vs the sum of task vectors") -> go.Figure:
    """‖merged‖ / ‖Σ τ_t‖ per matrix parameter, by depth (delta_stats output)."""
    fig = go.Figure()
    part = stats[stats["kind"] != "vector"] if "kind" in stats else stats
    if "ratio" in part:
        fig.add_scatter(x=part["depth"], y=part["ratio"], mode="markers", text=part["param"],
                        marker=dict(size=11, color=MERGED_COLOR), name="‖merged‖ ÷ ‖Σ τ‖",
                        hovertemplate="%{text}<br>depth %{x}<br>ratio %{y:.3f}<extra></extra>")
        fig.update_layout(yaxis_title="‖merged delta‖ ÷ ‖sum of task vectors‖")
    else:   # per-task (TSV-C): relative reconstruction error
        for task in dict.fromkeys(part["task"]):
            sub = part[part["task"] == task]
            fig.add_scatter(x=sub["depth"], y=sub["relative_error"], mode="markers", name=task, text=sub["param"],
                            hovertemplate="%{text}<br>depth %{x}<br>error %{y:.3f}<extra></extra>")
        fig.update_layout(yaxis_title="relative error ‖τ̂_t − τ_t‖ ÷ ‖τ_t‖")
    fig.update_layout(title=title, xaxis_title="layer depth (block index)")
    return apply_theme(fig)
