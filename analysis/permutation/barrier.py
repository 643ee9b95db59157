"""Straight-line paths between two parameter sets and their loss barriers.

Both barrier definitions come from `analysis.barriers` (defined once for every
page): "path" = max-over-path barrier, "midpoint" = midpoint barrier. For
accuracy the sign flips (a barrier is a dip below the ends).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from analysis.barriers import HIGHER_IS_BETTER, barrier_values
from analysis.errors import ValidationError
from analysis.permutation.specs import StateDict

EvalFn = Callable[[StateDict], Mapping[str, float]]


def interpolate(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """(1 - lam) A + lam B, parameter by parameter."""
    if set(sd_a) != set(sd_b):
        raise ValidationError(f"cannot interpolate: keys differ ({sorted(set(sd_a) ^ set(sd_b))[:5]})")
    return {k: torch.lerp(sd_a[k].float(), sd_b[k].float(), float(lam)) for k in sd_a}


def interpolation_curve(eval_fn: EvalFn, sd_a: StateDict, sd_b: StateDict, lambdas: Sequence[float],
                        repair_fn: Callable[[StateDict, float], StateDict] | None = None) -> pd.DataFrame:
    """Tidy table lam, metric, value of `eval_fn` along the path; `repair_fn`
    (sd, lam) -> sd is applied to interior points (e.g. REPAIR). An eval_fn with an
    `along(sd_a, sd_b, lambdas)` method (`analysis.permutation.mlp.MLPEvaluator`) scores the
    whole straight path in one call."""
    rows = []
    if repair_fn is None and hasattr(eval_fn, "along"):
        for lam, scores in zip(lambdas, eval_fn.along(sd_a, sd_b, lambdas)):
            rows += [{"lam": float(lam), "metric": metric, "value": float(value)} for metric, value in scores.items()]
        return pd.DataFrame(rows)
    for lam in lambdas:
        sd = interpolate(sd_a, sd_b, lam)
        if repair_fn is not None and 0.0 < lam < 1.0:
            sd = repair_fn(sd, float(lam))
        for metric, value in eval_fn(sd).items():
            rows.append({"lam": float(lam), "metric": metric, "value": float(value)})
    return pd.DataFrame(rows)


def barriers(curve: pd.DataFrame, metric: str = "loss") -> dict[str, float]:
    """Both barrier definitions of one metric's curve: {"path": …, "midpoint": …} (needs lam = 0 and lam = 1)."""
    c = curve[curve["metric"] == metric].sort_values("lam")
    found = barrier_values(c["lam"].to_numpy(), c["value"].to_numpy(), metric in HIGHER_IS_BETTER)
    return {key: value for key, (value, _) in found.items()}
