"""Loss and accuracy along straight paths between parameter sets, and barriers.

Generic over the model: every function takes an `evaluate` callable
(params -> tidy DataFrame with columns task, metric, value; e.g.
`functools.partial(evaluator.evaluate, split="validation", subsample=64)`),
so the same code serves the text backbone and the MNIST MLPs.

Barriers (per task and metric, on a grid of λ that contains 0 and 1): the
max-over-path and midpoint barriers of `analysis.barriers`, where both are
defined once for every page. For accuracy they are applied to the accuracy
*drop* (−A), so a positive barrier always means "worse than the ends".
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.barriers import BARRIERS, HIGHER_IS_BETTER, barrier_values
from analysis.errors import ValidationError

Evaluate = Callable[[Mapping[str, torch.Tensor]], pd.DataFrame]
Progress = Callable[[float, str], None] | None



def lambda_grid(points: int) -> np.ndarray:
    """`points` evenly spaced values from 0 to 1, both ends included."""
    if points < 2:
        raise ValidationError(f"a path needs at least 2 points (0 and 1), got points={points}")
    return np.linspace(0.0, 1.0, int(points))


def spread_order(known: Sequence[float], missing: Sequence[float]) -> list[float]:
    """`missing` grid points in the order that shows a curve's shape soonest: the two ends of the
    grid first when nothing is `known`, then always the point farthest from every point known or
    already taken (ties: the first in `missing`'s order)."""
    have, todo, order = [float(x) for x in known], [float(x) for x in missing], []
    if not have and todo:
        order = list(dict.fromkeys([min(todo), max(todo)]))
        have += order
        todo = [x for x in todo if x not in order]
    while todo:
        x = max(todo, key=lambda v: min(abs(v - h) for h in have))
        order.append(x)
        have.append(x)
        todo.remove(x)
    return order


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
        d = d.to(t.device, torch.float32)
        # one pass and one new tensor (t + α·d as one kernel) where θ0 is float32
        out[name] = torch.add(t, d, alpha=alpha) if t.dtype == torch.float32 else (t.float() + alpha * d).to(t.dtype)
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
    unknown = [n for n in names if n not in base]
    if unknown:
        raise ValidationError(f"the delta holds {unknown[0]!r}, which the base parameters lack")
    lambdas = lambda_grid(lambdas) if isinstance(lambdas, int) else np.asarray(lambdas, dtype=float)
    return _collect(evaluate, lambdas, lambda lam: _on_line(base, delta_a, delta_b, names, lam), "lam", progress)


def _on_line(base, delta_a, delta_b, names, lam: float) -> dict[str, torch.Tensor]:
    """θ0 + ((1−λ)δa + λδb) for `names` (a delta that lacks a tensor counts as zero there), the rest of θ0
    as is. One new tensor per name (`torch.lerp`, exact at both ends, then θ0 added in place): the zeros,
    products and sums of the arithmetic written out took 0.10–0.11 s a point on the quick demo (22.7 M
    floats, in-process, 2-core CPU), this 0.025–0.03 s, on the critical path of the Loss Landscape's first
    estimate."""
    out = dict(base)
    for name in names:
        t, a, b = base[name], delta_a.get(name), delta_b.get(name)
        a = None if a is None else a.to(t.device, torch.float32)
        b = None if b is None else b.to(t.device, torch.float32)
        if a is not None and b is not None:
            d = torch.lerp(a, b, lam)
        else:
            d = (1.0 - lam) * a if b is None else lam * b
        out[name] = d.add_(t) if t.dtype == torch.float32 else (t.float() + d).to(t.dtype)
    return out


def scaling_path(evaluate: Evaluate, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                 alphas: Sequence[float], progress: Progress = None) -> pd.DataFrame:
    """Metrics at θ0 + α·δ for each α: tidy table (alpha, task, metric, value, ...)."""
    return _collect(evaluate, np.asarray(alphas, dtype=float), lambda a: scale_delta(base, delta, a), "alpha", progress)


def barriers(curves: pd.DataFrame, coord: str = "lam") -> pd.DataFrame:
    """Both barrier definitions (`analysis.barriers.BARRIERS`) per task and metric of a path table.

    Tidy: task, metric, definition ('path' | 'midpoint'), value, at (the λ
    where it is taken). Needs λ = 0 and λ = 1 on the grid.
    """
    _check_tidy(curves)
    rows = []
    for (task, metric), g in curves.groupby(["task", "metric"], sort=False):
        g = g.groupby(coord)["value"].mean().sort_index()
        found = barrier_values(g.index.to_numpy(dtype=float), g.to_numpy(dtype=float), metric in HIGHER_IS_BETTER)
        for definition, (value, at) in found.items():
            rows.append({"task": task, "metric": metric, "definition": definition, "value": value, "at": at})
    return pd.DataFrame(rows, columns=["task", "metric", "definition", "value", "at"])


def barrier_table(barrier_df: pd.DataFrame, metric: str = "loss", scale: float = 1.0) -> pd.DataFrame:
    """Display form: one row per task, one column per definition (its shared name),
    and the λ where the max-over-path barrier is taken; values × `scale` (100 for accuracy in points)."""
    sub = barrier_df[barrier_df["metric"] == metric]
    order = list(dict.fromkeys(sub["task"]))  # the path table's task order, not alphabetical
    wide = sub.pivot(index="task", columns="definition", values="value").reindex(order)
    at = sub.pivot(index="task", columns="definition", values="at").reindex(order)
    out = pd.DataFrame(index=wide.index)
    for key, b in BARRIERS.items():
        if key in wide:
            out[b.label] = wide[key] * scale
    if "path" in at:
        out[f"λ of the {BARRIERS['path'].label}"] = at["path"]
    return out.reset_index()


def best_scale(curves: pd.DataFrame, coord: str = "alpha", metric: str = "accuracy") -> dict:
    """The grid point with the best mean `metric` over tasks on a scaling path,
    with how sure that is at the sample size used.

    Returns {"at", "mean", "se", "n_per_task": {task: n}, "tied": [grid points whose
    mean is within 2 standard errors of the best]}. The standard error of a mean
    of per-task accuracies p_t on n_t examples is √(Σ_t p_t(1−p_t)/n_t) / T
    (binomial, tasks independent); it needs the table's `n` column, and is NaN without it.
    """
    sub = curves[curves["metric"] == metric]
    if sub.empty:
        raise ValidationError(f"no {metric!r} rows in the path table")
    per = sub.groupby([coord, "task"], sort=True)["value"].mean().unstack("task")
    means = per.mean(axis=1)
    best = float(means.idxmax())
    n = sub.groupby("task")["n"].max() if "n" in sub else None

    def se(row) -> float:
        if n is None:
            return float("nan")
        p = row.to_numpy(dtype=float)
        return float(np.sqrt(np.sum(p * (1 - p) / n.reindex(row.index).to_numpy(dtype=float))) / len(p))

    ses = per.apply(se, axis=1)
    gap = 2 * np.sqrt(ses ** 2 + float(ses[best]) ** 2)
    tied = [float(x) for x in means.index if x != best and means[best] - means[x] <= gap[x]]
    return {"at": best, "mean": float(means[best]), "se": float(ses[best]),
            "n_per_task": {} if n is None else {t: int(v) for t, v in n.items()}, "tied": tied}


def _check_tidy(df: pd.DataFrame) -> None:
    missing = {"task", "metric", "value"} - set(df.columns)
    if missing:
        raise ValidationError(f"the evaluate function must return a tidy table with columns task, metric, value; "
                              f"missing {sorted(missing)}")
