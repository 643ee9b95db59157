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
from analysis.plots import PALETTE, apply_theme, cluster_order, data_range, task_color

SIGMA_AXIS = "singular value σᵢ (weight units, log scale)"
ENERGY_AXIS = "energy kept (% of the sum of squared singular values)"
DEPTH_AXIS = "block depth (0 = first block)"


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
                              {"title.subtitle.text": layer}])
                   for li, layer in enumerate(layers)]
        fig.update_layout(updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.18, yanchor="bottom",
                                            showactive=True)])
    fig.update_layout(xaxis_title="singular value index i (1 = largest)", yaxis_title=SIGMA_AXIS)
    if log:
        fig.update_yaxes(type="log", exponentformat="power")
    return apply_theme(fig, title="Singular values per task", subtitle=layers[0])


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
    where = param if param is not None else "mean over all layers"
    fig.update_layout(xaxis_title="rank kept (% of min(m, n))", yaxis_title=ENERGY_AXIS)
    fig.update_yaxes(range=[0, 101])
    return apply_theme(fig, title="Energy kept by the top singular values", subtitle=where)


def effective_rank_figure(er: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Effective rank / k vs block depth, mean over a block's matrices, one line per task."""
    tasks = _tasks(er, tasks)
    df = er[er["depth"].notna()].groupby(["task", "depth"])["effective_rank_fraction"].mean().reset_index()
    fig = go.Figure()
    for task in tasks:
        t = df[df["task"] == task].sort_values("depth")
        fig.add_trace(go.Scatter(x=t["depth"], y=100 * t["effective_rank_fraction"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    fig.update_layout(xaxis_title=DEPTH_AXIS, yaxis_title="effective rank (% of min(m, n))")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig, title="Effective rank by depth", subtitle="mean over the block's matrices")


def sti_depth_figure(sti: pd.DataFrame, log: bool = False) -> go.Figure:
    """STI vs block depth, one line per module (query, mlp, ...)."""
    df = sti[sti["depth"].notna()].sort_values("depth")
    fig = go.Figure()
    for i, (module, t) in enumerate(df.groupby("module", sort=False)):
        fig.add_trace(go.Scatter(x=t["depth"], y=t["sti"], mode="lines+markers", name=module,
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2.5)))
    rank = f"rank {int(sti['rank'].iloc[0])} per task" if len(sti) and sti["rank"].nunique() == 1 else None
    fig.update_layout(xaxis_title=DEPTH_AXIS, yaxis_title="interference (weight units)")
    fig.update_xaxes(dtick=1)
    if log:
        fig.update_yaxes(type="log")
    return apply_theme(fig, title="Singular Task Interference by depth", subtitle=rank)


_HEAT = {"cosine": dict(colorscale="RdBu", zmid=0.0, zmin=-1.0, zmax=1.0, label="cosine similarity"),
         "conflict_rate": dict(colorscale="OrRd", zmin=0.0, zmax=1.0, label="sign-conflict rate"),
         "sti": dict(colorscale="Viridis", label="pairwise interference (weight units)"),
         "sar": dict(colorscale="Viridis", zmin=0.0, zmax=1.0, label="subspace alignment ratio")}
# values additive over a block's layers (summed per depth); the others must come per depth already
_ADDITIVE = {"sti"}
CELL = 58          # px per task row/column of a task × task heatmap
PAIR_ROW = 24      # px per task-pair row of a pair × depth heatmap


def _style(value: str) -> tuple[dict, str]:
    style = dict(_HEAT.get(value, dict(colorscale="Viridis", label=value)))
    return style, style.pop("label")


def task_heatmap(df: pd.DataFrame, value: str, tasks: Sequence[str] | None = None, title: str | None = None,
                 cluster: bool = True) -> go.Figure:
    """Task × task heatmap of `value` (tidy table with task, task_b; pairs
    missing from the table, e.g. the diagonal of STI, are left blank).

    With `cluster`, tasks are ordered by hierarchical clustering of their rows
    (`cluster_order`), so tasks that behave alike sit together; the figure is
    sized to the task count (square cells), with numbers in the cells up to 12 tasks."""
    tasks = _tasks(df, tasks)
    grid = df.pivot_table(index="task", columns="task_b", values=value, aggfunc="sum").reindex(index=tasks, columns=tasks)
    if cluster:
        order = [tasks[i] for i in cluster_order(grid.to_numpy())]
        grid = grid.reindex(index=order, columns=order)
        tasks = order
    style, label = _style(value)
    fmt = ".2f" if value in ("cosine", "conflict_rate", "sar") else ".3g"
    text = dict(texttemplate=f"%{{z:{fmt}}}", textfont=dict(size=12)) if len(tasks) <= 12 else {}
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=tasks, y=tasks, colorbar=dict(title=label, title_side="right",
                                                                                  thickness=14),
                               hovertemplate="%{y} × %{x}: %{z:.4g}<extra></extra>", xgap=1, ygap=1, **text, **style))
    fig.update_xaxes(tickangle=-45, side="bottom", constrain="domain")
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    side = CELL * len(tasks)
    return apply_theme(fig, height=side + 260, title=title or label,
                       subtitle="tasks ordered by hierarchical clustering" if cluster and len(tasks) > 2 else None)


def pair_depth_heatmap(df: pd.DataFrame, value: str, tasks: Sequence[str] | None = None,
                       title: str | None = None) -> go.Figure:
    """Task pair × block depth heatmap (each unordered pair once, one row per
    pair with its label written horizontally, one column per block).

    `df`: a pair table with a depth column: per parameter for additive values
    (STI, summed over a block's layers) or already per depth (cosine, sign
    conflicts: `cosine_table(stats, "depth")`). Layers outside the numbered
    blocks are left out. Rows are ordered by hierarchical clustering of their
    depth profiles; the height grows with the number of pairs."""
    tasks = _tasks(df, tasks)
    pairs = unordered_pairs(df[df["depth"].notna()], tasks)
    if value not in _ADDITIVE and pairs.duplicated(["pair", "depth"]).any():
        raise ValueError(f"{value!r} is not additive over a block's layers: pass a table per depth "
                         "(e.g. cosine_table(stats, 'depth')), not per parameter")
    grid = pairs.pivot_table(index="pair", columns="depth", values=value, aggfunc="sum")
    grid = grid.reindex(index=list(dict.fromkeys(pairs["pair"])), columns=sorted(grid.columns))
    grid = grid.iloc[cluster_order(grid.to_numpy())]
    style, label = _style(value)
    depths = [int(d) for d in grid.columns]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=depths, y=list(grid.index), xgap=1, ygap=1,
                               colorbar=dict(title=label, title_side="right", thickness=14),
                               hovertemplate="%{y}<br>block %{x}: %{z:.4g}<extra></extra>", **style))
    fig.update_xaxes(title_text=DEPTH_AXIS, dtick=1, side="bottom")
    fig.update_yaxes(autorange="reversed", title_text="", tickfont=dict(size=13))
    return apply_theme(fig, height=PAIR_ROW * len(grid) + 220, title=title or f"{label} by block and task pair",
                       subtitle="pairs ordered by hierarchical clustering of their depth profiles")


def sar_depth_figure(sar: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Subspace alignment ratio per block depth (aggregated table from `sar_by(..., "depth")`), one line per task."""
    tasks = _tasks(sar, tasks)
    fig = go.Figure()
    for task in tasks:
        t = sar[sar["task"] == task].sort_values("depth")
        fig.add_trace(go.Scatter(x=t["depth"], y=t["sar"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5)))
    fig.update_layout(xaxis_title=DEPTH_AXIS, yaxis_title="subspace alignment ratio (0 to 1)")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(dtick=1)
    return apply_theme(fig, title="Subspace alignment ratio by depth")


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
    n = f", {int(df['n'].max())} examples per task at most" if "n" in df and len(df) else ""
    fig.update_layout(xaxis_title="rank kept (% of min(m, n), log scale)", yaxis_title="accuracy (%)")
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=data_range(100 * df["value"], ceiling=100.5, step=2))
    return apply_theme(fig, title="TSV-C: accuracy of each compressed task model", subtitle=f"{split} split{n}")
