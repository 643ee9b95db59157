"""Loss and accuracy along straight paths between parameter sets, and barriers.

Generic over the model: every function takes an `evaluate` callable
(params -> tidy DataFrame with columns task, metric, value; e.g.
`functools.partial(evaluator.evaluate, split="validation", subsample=64)`),
so the same code serves the text backbone and the MNIST MLPs.

Barriers (per task and metric, on a grid of λ that contains 0 and 1):
- midpoint: max_λ L(λ) − ½(L(0) + L(1))
- linear:   max_λ L(λ) − ((1−λ) L(0) + λ L(1))
For accuracy, where lower is worse, the same definitions are applied to the
accuracy *drop* (−A), so a positive barrier always means "worse than the ends".
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.errors import ValidationError

Evaluate = Callable[[Mapping[str, torch.Tensor]], pd.DataFrame]
Progress = Callable[[float, str], None] | None

BARRIER_DEFINITIONS = {
    "midpoint": "max_λ L(λ) − ½(L(0)+L(1))",
    "linear": "max_λ L(λ) − ((1−λ)L(0)+λL(1))",
}
# metrics where larger is better; their barrier is computed on the negated curve
HIGHER_IS_BETTER = {"accuracy"}


def lambda_grid(points: int) -> np.ndarray:
    """`points` evenly spaced values from 0 to 1, both ends included."""
    if points < 2:
        raise ValidationError(f"a path needs at least 2 points (0 and 1), got points={points}")
    return np.linspace(0.0, 1.0, int(points))


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """(1−λ)·a + λ·b for floating tensors; other tensors (buffers) are taken from `a`."""
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValidationError(f"the two endpoints hold different tensors, e.g. {diff[:3]}")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if tuple(ta.shape) != tuple(tb.shape):
            raise ValidationError(f"tensor {name!r} has shape {tuple(ta.shape)} at one end and {tuple(tb.shape)} at the other")
        if ta.dtype.is_floating_point:
            out[name] = ((1.0 - lam) * ta.float() + lam * tb.to(ta.device).float()).to(ta.dtype)
        else:
            out[name] = ta
    return out


def scale_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ0 + α·δ (tensors absent from δ come from θ0 unchanged)."""
    unknown = [k for k in delta if k not in base]
    if unknown:
        raise ValidationError(f"the delta holds {unknown[0]!r}, which the base parameters lack")
    out = dict(base)
    for name, d in delta.items():
        t = base[name]
        out[name] = (t.float() + alpha * d.to(t.device, torch.float32)).to(t.dtype)
    return out


def _collect(evaluate: Evaluate, points: Sequence[float], params_at: Callable[[float], Mapping], coord: str,
             progress: Progress) -> pd.DataFrame:
    frames = []
    for i, x in enumerate(points):
        if progress:
            progress(i / len(points), f"{coord} = {x:.3g} ({i + 1}/{len(points)})")
        df = evaluate(params_at(float(x)))
        _check_tidy(df)
        df = df.copy()
        df.insert(0, coord, float(x))
        frames.append(df)
    if progress:
        progress(1.0, "done")
    return pd.concat(frames, ignore_index=True)


def linear_path(evaluate: Evaluate, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                lambdas: Sequence[float] | int = 11, progress: Progress = None) -> pd.DataFrame:
    """Metrics at θ(λ) = (1−λ)·start + λ·end: tidy table (lam, task, metric, value, ...)."""
    lambdas = lambda_grid(lambdas) if isinstance(lambdas, int) else np.asarray(lambdas, dtype=float)
    return _collect(evaluate, lambdas, lambda lam: interpolate(start, end, lam), "lam", progress)


def delta_path(evaluate: Evaluate, base: Mapping[str, torch.Tensor], delta_a: Mapping[str, torch.Tensor],
               delta_b: Mapping[str, torch.Tensor], lambdas: Sequence[float] | int = 11,
               progress: Progress = None) -> pd.DataFrame:
    """The straight line between θ0 + δa and θ0 + δb, built as θ0 + ((1−λ)δa + λδb).

    Same numbers as `linear_path` on the two full models, but only the tensors
    the deltas touch are interpolated (cheaper on a large backbone).
    """
    names = sorted(set(delta_a) | set(delta_b))
    zero = {n: torch.zeros_like(base[n], dtype=torch.float32) for n in names}
    da = {n: delta_a.get(n, zero[n]).float() for n in names}
    db = {n: delta_b.get(n, zero[n]).float() for n in names}
    lambdas = lambda_grid(lambdas) if isinstance(lambdas, int) else np.asarray(lambdas, dtype=float)
    return _collect(evaluate, lambdas, lambda lam: scale_delta(base, interpolate(da, db, lam), 1.0), "lam", progress)


def scaling_path(evaluate: Evaluate, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                 alphas: Sequence[float], progress: Progress = None) -> pd.DataFrame:
    """Metrics at θ0 + α·δ for each α: tidy table (alpha, task, metric, value, ...)."""
    return _collect(evaluate, np.asarray(alphas, dtype=float), lambda a: scale_delta(base, delta, a), "alpha", progress)


def barriers(curves: pd.DataFrame, coord: str = "lam") -> pd.DataFrame:
    """Both barrier definitions per task and metric of a path table.

    Tidy: task, metric, definition ('midpoint' | 'linear'), value, at (the λ of
    the maximum). Needs λ = 0 and λ = 1 on the grid.
    """
    _check_tidy(curves)
    lams = np.unique(curves[coord].to_numpy(dtype=float))
    if not (np.isclose(lams.min(), 0.0) and np.isclose(lams.max(), 1.0)):
        raise ValidationError(f"barriers need the path's ends λ=0 and λ=1 on the grid; it spans "
                              f"[{lams.min():.3g}, {lams.max():.3g}]")
    rows = []
    for (task, metric), g in curves.groupby(["task", "metric"], sort=False):
        g = g.groupby(coord)["value"].mean().sort_index()
        lam = g.index.to_numpy(dtype=float)
        sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
        y = sign * g.to_numpy(dtype=float)
        y0, y1 = y[0], y[-1]
        for definition, ref in (("midpoint", np.full_like(y, 0.5 * (y0 + y1))),
                                ("linear", (1.0 - lam) * y0 + lam * y1)):
            excess = y - ref
            i = int(np.nanargmax(excess))
            rows.append({"task": task, "metric": metric, "definition": definition,
                         "value": float(excess[i]), "at": float(lam[i])})
    return pd.DataFrame(rows, columns=["task", "metric", "definition", "value", "at"])


def barrier_table(barrier_df: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """Display form: one row per task, one column per definition (labelled with its formula)."""
    sub = barrier_df[barrier_df["metric"] == metric]
    order = list(dict.fromkeys(sub["task"]))  # the path table's task order, not alphabetical
    wide = sub.pivot(index="task", columns="definition", values="value").reindex(order)
    at = sub.pivot(index="task", columns="definition", values="at").reindex(order)
    out = pd.DataFrame(index=wide.index)
    for d in ("midpoint", "linear"):
        if d in wide:
            out[f"{d}: {BARRIER_DEFINITIONS[d]}"] = wide[d]
            out[f"λ at max ({d})"] = at[d]
    return out.reset_index()


def _check_tidy(df: pd.DataFrame) -> None:
    missing = {"task", "metric", "value"} - set(df.columns)
    if missing:
        raise ValidationError(f"the evaluate function must return a tidy table with columns task, metric, value; "
                              f"missing {sorted(missing)}")
