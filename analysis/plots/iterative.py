"""Per-round curves of an iterative merging run (analysis.iterative's tidy table)."""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots import PALETTE, apply_theme, task_color

MEAN_COLOR = "#000000"


def _series(table: pd.DataFrame, metric: str, task: str) -> pd.DataFrame:
    part = table[(table["metric"] == metric) & (table["task"] == task)]
    return part.sort_values("round")


def accuracy_curves(table: pd.DataFrame, tasks: Sequence[str], title: str = "Accuracy per round",
                    baselines: Mapping[str, float] | None = None) -> go.Figure:
    """Accuracy (%) of the shared model per task and their mean, against the round (0 = the start).

    `baselines`: {label: mean accuracy in [0, 1]} drawn as dashed horizontal lines (one-shot merges)."""
    fig = go.Figure()
    for task in tasks:
        s = _series(table, "accuracy", task)
        fig.add_scatter(x=s["round"], y=s["value"] * 100, mode="lines+markers", name=task,
                        line=dict(color=task_color(task, tasks), width=1.5))
    s = _series(table, "mean_accuracy", "mean")
    fig.add_scatter(x=s["round"], y=s["value"] * 100, mode="lines+markers", name="mean",
                    line=dict(color=MEAN_COLOR, width=4))
    span = [s["round"].min(), s["round"].max()] if len(s) else [0, 1]
    for i, (label, value) in enumerate((baselines or {}).items()):
        # a legend entry, not an annotation: close baselines' labels overlapped each other
        fig.add_scatter(x=span, y=[value * 100] * 2, mode="lines", name=label,
                        line=dict(dash="dash", color=PALETTE[(i + 3) % len(PALETTE)], width=2))
    fig.update_layout(title=title, xaxis_title="round", yaxis_title="accuracy (%)")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)


def geometry_curves(table: pd.DataFrame, title: str = "Task vectors per round") -> go.Figure:
    """Mean pairwise cosine of the round's task vectors, and ‖θ_r − θ_{r-1}‖, against the round."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean pairwise cosine of task vectors",
                                                        "norm of the update ‖θ_r − θ_{r−1}‖"))
    cos = _series(table, "cosine", "all")
    norm = _series(table, "update_norm", "all")
    fig.add_scatter(x=cos["round"], y=cos["value"], mode="lines+markers", name="cosine",
                    line=dict(color=PALETTE[0], width=3), row=1, col=1)
    fig.add_scatter(x=norm["round"], y=norm["value"], mode="lines+markers", name="update norm",
                    line=dict(color=PALETTE[3], width=3), row=1, col=2)
    fig.update_xaxes(dtick=1, title_text="round")
    fig.update_layout(title=title, showlegend=False)
    return apply_theme(fig, height=420)


def heldout_curves(table: pd.DataFrame, heldout: Sequence[str],
                   title: str = "Held-out tasks: the fused model as a starting point") -> go.Figure:
    """Linear-probe and short-fine-tune accuracy (%) on each held-out task and their mean, per round
    (round 0 = the original backbone, drawn as a dashed reference line)."""
    fig = go.Figure()
    for metric, label, dash in (("heldout_probe_accuracy", "linear probe", "solid"),
                                ("heldout_finetune_accuracy", "short fine-tune", "dot")):
        for task in list(heldout) + ["mean"]:
            s = _series(table, metric, task)
            if not len(s):
                continue
            color = MEAN_COLOR if task == "mean" else task_color(task, heldout)
            fig.add_scatter(x=s["round"], y=s["value"] * 100, mode="lines+markers", name=f"{task} · {label}",
                            line=dict(color=color, dash=dash, width=4 if task == "mean" else 1.5))
            if task == "mean":
                fig.add_scatter(x=[s["round"].min(), s["round"].max()], y=[float(s["value"].iloc[0]) * 100] * 2,
                                mode="lines", name=f"original backbone · {label}",
                                line=dict(color="#9e9e9e", dash="dash" if dash == "solid" else "dashdot", width=2))
    fig.update_layout(title=title, xaxis_title="round (0 = original backbone)", yaxis_title="accuracy (%)")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)
