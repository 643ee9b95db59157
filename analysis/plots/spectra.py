"""Figures for spectra and interference: tidy DataFrame -> plotly Figure.

Inputs are the tables of analysis.spectra and analysis.interference; every
function is pure (no state, no streamlit). Task colours come from
`task_color`, so a task has the same colour on every page.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from analysis.interference import unordered_pairs
from analysis.plots import PALETTE, apply_theme, task_color

SIGMA_AXIS = "singular value σᵢ (weight units, log scale)"


def _tasks(df: pd.DataFrame, tasks: Sequence[str] | None) -> list[str]:
    return list(tasks) if tasks is not None else list(dict.fromkeys(df["task"]))


def _layer_order(df: pd.DataFrame) -> list[str]:
    """Parameters in model order: by depth (no block last), then first appearance."""
    first = df.drop_duplicates("param")[["param", "depth"]].reset_index(drop=True)
    first["pos"] = range(len(first))
    first["d"] = first["depth"].fillna(10 ** 9)
    return first.sort_values(["d", "pos"])["param"].tolist()


def spectrum_figure(sv: pd.DataFrame, param: str | None = None, tasks: Sequence[str] | None = None,
                    params: Sequence[str] | None = None, log: bool = True) -> go.Figure:
    """Singular values of each task (one line per task) for one layer, log y.
    With `params` (several layers) the figure carries its own layer chooser
    (a dropdown), so an exported HTML file keeps it."""
    tasks = _tasks(sv, tasks)
    layers = list(params) if params else [param or _layer_order(sv)[0]]
    fig = go.Figure()
    for li, layer in enumerate(layers):
        sub = sv[sv["param"] == layer]
        for task in tasks:
            t = sub[sub["task"] == task]
            fig.add_trace(go.Scatter(x=t["index"] + 1, y=t["sigma"], mode="lines", name=task,
                                     line=dict(color=task_color(task, tasks), width=2.5),
                                     legendgroup=task, showlegend=True, visible=(li == 0),
                                     hovertemplate=f"{task}<br>i=%{{x}}<br>σ=%{{y:.3g}}<extra></extra>"))
    if len(layers) > 1:
        n = len(tasks)
        buttons = [dict(label=layer, method="update",
                        args=[{"visible": [j // n == li for j in range(n * len(layers))]},
                              {"title.text": f"Singular values — {layer}"}])
                   for li, layer in enumerate(layers)]
        fig.update_layout(updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.18, yanchor="bottom",
                                            showactive=True)])
    fig.update_layout(title=f"Singular values — {layers[0]}",
                      xaxis_title="singular value index i (1 = largest)", yaxis_title=SIGMA_AXIS)
    if log:
        fig.update_yaxes(type="log", exponentformat="power")
    return apply_theme(fig)


def energy_figure(energy: pd.DataFrame, param: str | None = None, tasks: Sequence[str] | None = None,
                  rank_fraction: float | None = None) -> go.Figure:
    """Share of squared Frobenius norm kept vs rank fraction, one line per
    task: for one layer, or the mean over layers when `param` is None.
    A dashed vertical line marks the current rank fraction."""
    tasks = _tasks(energy, tasks)
    df = energy if param is None else energy[energy["param"] == param]
    df = df.groupby(["task", "rank_fraction"], sort=False)["energy"].mean().reset_index()
    fig = go.Figure()
    for task in tasks:
        t = df[df["task"] == task].sort_values("rank_fraction")
        fig.add_trace(go.Scatter(x=100 * t["rank_fraction"], y=100 * t["energy"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    if rank_fraction is not None:
        fig.add_vline(x=100 * rank_fraction, line_dash="dash", line_color="#616161")
    where = param if param is not None else "mean over layers"
    fig.update_layout(title=f"Energy kept by the top singular values — {where}",
                      xaxis_title="rank fraction kept (% of min(m, n))", yaxis_title="energy kept (% of ‖Δ‖²_F)")
    fig.update_yaxes(range=[0, 101])
    return apply_theme(fig)


def effective_rank_figure(er: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Effective rank / k vs block depth, mean over a block's matrices, one line per task."""
    tasks = _tasks(er, tasks)
    df = er[er["depth"].notna()].groupby(["task", "depth"])["effective_rank_fraction"].mean().reset_index()
    fig = go.Figure()
    for task in tasks:
        t = df[df["task"] == task].sort_values("depth")
        fig.add_trace(go.Scatter(x=t["depth"], y=100 * t["effective_rank_fraction"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    fig.update_layout(title="Effective rank by depth (mean over the block's matrices)",
                      xaxis_title="block depth (0 = first block)", yaxis_title="effective rank (% of min(m, n))")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)


def sti_depth_figure(sti: pd.DataFrame, log: bool = False) -> go.Figure:
    """STI vs block depth, one line per module (query, mlp, ...)."""
    df = sti[sti["depth"].notna()].sort_values("depth")
    fig = go.Figure()
    for i, (module, t) in enumerate(df.groupby("module", sort=False)):
        fig.add_trace(go.Scatter(x=t["depth"], y=t["sti"], mode="lines+markers", name=module,
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2.5)))
    rank = f" (rank {int(sti['rank'].iloc[0])} per task)" if len(sti) and sti["rank"].nunique() == 1 else ""
    fig.update_layout(title=f"Singular Task Interference by depth{rank}",
                      xaxis_title="block depth (0 = first block)",
                      yaxis_title="STI = ‖(UᵀU−I)Σ(VᵀV−I)‖₁ (weight units)")
    fig.update_xaxes(dtick=1)
    if log:
        fig.update_yaxes(type="log")
    return apply_theme(fig)


_HEAT = {"cosine": dict(colorscale="RdBu", zmid=0.0, zmin=-1.0, zmax=1.0, label="cosine similarity"),
         "conflict_rate": dict(colorscale="OrRd", zmin=0.0, zmax=1.0, label="sign-conflict rate (share of entries)"),
         "sti": dict(colorscale="Viridis", label="pairwise STI (weight units)"),
         "sar": dict(colorscale="Viridis", zmin=0.0, zmax=1.0, label="subspace alignment ratio")}


def task_heatmap(df: pd.DataFrame, value: str, tasks: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Task × task heatmap of `value` (tidy table with task, task_b; pairs
    missing from the table, e.g. the diagonal of STI, are left blank)."""
    tasks = _tasks(df, tasks)
    grid = df.pivot_table(index="task", columns="task_b", values=value, aggfunc="sum").reindex(index=tasks, columns=tasks)
    style = dict(_HEAT.get(value, dict(colorscale="Viridis", label=value)))
    label = style.pop("label")
    fmt = ".2f" if value in ("cosine", "conflict_rate", "sar") else ".3g"
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=tasks, y=tasks, colorbar=dict(title=label, title_side="right"),
                               texttemplate=f"%{{z:{fmt}}}", hovertemplate="%{y} × %{x}: %{z:.4g}<extra></extra>",
                               **style))
    fig.update_layout(title=title or label, xaxis_title="task", yaxis_title="task")
    fig.update_yaxes(autorange="reversed")
    return apply_theme(fig, height=max(420, 70 * len(tasks) + 200))


def layer_pair_heatmap(df: pd.DataFrame, value: str, tasks: Sequence[str] | None = None,
                       title: str | None = None) -> go.Figure:
    """Layer × task-pair heatmap of a per-parameter pair table (each unordered pair once)."""
    tasks = _tasks(df, tasks)
    pairs = unordered_pairs(df, tasks)
    order = _layer_order(pairs)
    cols = list(dict.fromkeys(pairs["pair"]))
    grid = pairs.pivot_table(index="param", columns="pair", values=value, aggfunc="sum").reindex(index=order, columns=cols)
    style = dict(_HEAT.get(value, dict(colorscale="Viridis", label=value)))
    label = style.pop("label")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=cols, y=order, colorbar=dict(title=label, title_side="right"),
                               hovertemplate="%{y}<br>%{x}: %{z:.4g}<extra></extra>", **style))
    fig.update_layout(title=title or f"{label} by layer and task pair", xaxis_title="task pair",
                      yaxis_title="layer (model order, first block on top)")
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=11))
    return apply_theme(fig, height=max(480, 18 * len(order) + 220))


def sar_depth_figure(sar: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Subspace alignment ratio per block depth (aggregated table from `sar_by(..., "depth")`), one line per task."""
    tasks = _tasks(sar, tasks)
    fig = go.Figure()
    for task in tasks:
        t = sar[sar["task"] == task].sort_values("depth")
        fig.add_trace(go.Scatter(x=t["depth"], y=t["sar"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    fig.update_layout(title="Subspace alignment ratio by depth", xaxis_title="block depth (0 = first block)",
                      yaxis_title="SAR = ‖Πτ‖_F / ‖τ‖_F (unitless)")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)


def tsvc_accuracy_figure(acc: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Accuracy of each task's TSV-C-compressed model vs rank fraction (log x)."""
    tasks = _tasks(acc, tasks)
    df = acc[acc["metric"] == "accuracy"]
    fig = go.Figure()
    for task in tasks:
        t = df[df["task"] == task].sort_values("rank_fraction")
        if t.empty:
            continue
        fig.add_trace(go.Scatter(x=100 * t["rank_fraction"], y=100 * t["value"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    split = df["split"].iloc[0] if len(df) else ""
    fig.update_layout(title=f"TSV-C: accuracy of each compressed task model ({split} split)",
                      xaxis_title="rank fraction kept (% of min(m, n), log scale)", yaxis_title="accuracy (%)")
    fig.update_xaxes(type="log")
    return apply_theme(fig)
