"""Figures of the Curvature page: per-layer Fisher mass, EpiMer's diagnostics by
depth, and where the curvature-aware merge departs from task arithmetic.

Inputs are the tidy tables of `analysis.merging.epimer` (`fisher_mass_table`,
`epimer_diagnostics`); layers outside the numbered blocks (depth None) are
left out of the by-depth figures and kept in the rankings."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from analysis.plots import PALETTE, apply_theme, task_color

DEPTH_AXIS = "block depth (0 = first block)"
DIAGNOSTIC_LABELS = {
    "frechet_variance": ("Subspace Fréchet variance", "Σ_t ‖c* − c_t‖²_{A_t}"),
    "residual_energy": ("Residual energy outside the subspace", "Σ_t r_tᵀ H_t r_t"),
    "quadratic_loss": ("Quadratic-model loss at the merge", "½ Σ_t ‖Bc* − τ_t‖²_{H_t}"),
    "heterogeneity": ("Curvature heterogeneity", "dispersion of BᵀH_tB ÷ tr"),
    "flat_departure": ("Curvature-aware vs flat subspace mean", "‖c* − c̄‖_Ā ÷ ‖c̄‖_Ā"),
    "predicted_gain": ("Predicted gain over the flat mean", "share of quadratic loss removed"),
    "ta_departure": ("Departure from task arithmetic", "‖δ_EpiMer − δ_TA‖ ÷ ‖δ_TA‖"),
}


def _by_depth(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    part = table[(table["metric"] == metric) & table["depth"].notna()]
    return part.sort_values("depth")


def fisher_mass_figure(mass: pd.DataFrame, tasks: Sequence[str] | None = None) -> go.Figure:
    """Share of each task's Fisher mass held by each block (fisher_mass_table, summed per depth), one line per task."""
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(mass["task"]))
    part = mass[mass["depth"].notna()]
    fig = go.Figure()
    for task in tasks:
        t = part[part["task"] == task].groupby("depth", as_index=False)["share"].sum().sort_values("depth")
        fig.add_trace(go.Scatter(x=t["depth"], y=100 * t["share"], mode="lines+markers", name=task,
                                 line=dict(color=task_color(task, tasks), width=2.5),
                                 hovertemplate=f"{task}<br>depth %{{x}}<br>%{{y:.2f}} % of its Fisher mass<extra></extra>"))
    fig.update_layout(title="Fisher mass by depth (each task normalised to its own total)", xaxis_title=DEPTH_AXIS,
                      yaxis_title="share of the task's Σ diag Fisher (%)")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)


def error_terms_figure(table: pd.DataFrame) -> go.Figure:
    """The two terms of EpiMer's error bound per depth (summed over the block's layers), stacked, with
    the quadratic-model loss at the merge (≤ their sum) as markers."""
    fig = go.Figure()
    colors = {"frechet_variance": PALETTE[0], "residual_energy": PALETTE[1], "quadratic_loss": PALETTE[7]}
    names = {"frechet_variance": "V: Fréchet variance", "residual_energy": "R: residual outside the subspace"}
    for metric in ("frechet_variance", "residual_energy"):
        t = _by_depth(table, metric).groupby("depth", as_index=False)["value"].sum()
        fig.add_bar(x=t["depth"], y=t["value"], name=names[metric], marker_color=colors[metric],
                    hovertemplate="depth %{x}<br>%{y:.4g}<extra></extra>")
    t = _by_depth(table, "quadratic_loss").groupby("depth", as_index=False)["value"].sum()
    fig.add_scatter(x=t["depth"], y=t["value"], mode="markers", name="loss at the merge (≤ V + R)",
                    marker=dict(size=12, symbol="diamond", color=colors["quadratic_loss"]))
    fig.update_layout(barmode="stack", title="EpiMer's error-bound terms by depth",
                      xaxis_title=DEPTH_AXIS, yaxis_title="metric units (Σ over the block's layers)")
    fig.update_xaxes(dtick=1)
    return apply_theme(fig)


def diagnostic_depth_figure(table: pd.DataFrame, metric: str, log: bool = False) -> go.Figure:
    """One diagnostic per layer vs depth, one line per module (query, mlp, …)."""
    title, axis = DIAGNOSTIC_LABELS.get(metric, (metric, metric))
    df = _by_depth(table, metric)
    fig = go.Figure()
    for i, (module, t) in enumerate(df.groupby("module", sort=False)):
        fig.add_trace(go.Scatter(x=t["depth"], y=t["value"], mode="lines+markers", name=module, text=t["param"],
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2.5),
                                 hovertemplate="%{text}<br>depth %{x}<br>%{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"{title} by depth", xaxis_title=DEPTH_AXIS, yaxis_title=axis)
    fig.update_xaxes(dtick=1)
    if log:
        fig.update_yaxes(type="log")
    return apply_theme(fig)


def top_departures(table: pd.DataFrame, n: int = 15) -> pd.DataFrame:
    """The `n` layers where EpiMer departs most from task arithmetic, with their heterogeneity."""
    wide = table.pivot_table(index="param", columns="metric", values="value", sort=False)
    meta = table.drop_duplicates("param").set_index("param")[["depth", "module", "curvature", "k"]]
    cols = [c for c in ("ta_departure", "flat_departure", "heterogeneity", "predicted_gain") if c in wide.columns]
    out = meta.join(wide[cols]).reset_index()
    if "ta_departure" in out:
        out = out.sort_values("ta_departure", ascending=False, na_position="last")
    return out.head(n).reset_index(drop=True)


def departure_bars(table: pd.DataFrame, n: int = 15) -> go.Figure:
    """Horizontal bars: the layers where the curvature-aware merge departs most from task arithmetic."""
    top = top_departures(table, n).iloc[::-1]
    fig = go.Figure(go.Bar(x=100 * top["ta_departure"], y=top["param"], orientation="h", marker_color=PALETTE[3],
                           customdata=top[["heterogeneity"]].to_numpy() if "heterogeneity" in top else None,
                           hovertemplate="%{y}<br>%{x:.2f} % from task arithmetic"
                                         "<br>heterogeneity %{customdata[0]:.3g}<extra></extra>"))
    fig.update_layout(title=f"Where EpiMer departs most from task arithmetic (top {len(top)} layers)",
                      xaxis_title="‖δ_EpiMer − δ_TA‖ ÷ ‖δ_TA‖ (%)", yaxis_title="")
    return apply_theme(fig, height=max(420, 28 * len(top) + 200))
