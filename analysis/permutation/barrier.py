"""Straight-line paths between two parameter sets and their loss barriers.

Two definitions, both reported and labelled:
- `barrier_mean`:   max_lam L(lam) - (L(0) + L(1)) / 2
- `barrier_linear`: max_lam L(lam) - ((1 - lam) L(0) + lam L(1))
For accuracy the sign flips (a barrier is a dip): interpolated endpoint
accuracy minus the path's accuracy, maximised over lam.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

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
    (sd, lam) -> sd is applied to interior points (e.g. REPAIR)."""
    rows = []
    for lam in lambdas:
        sd = interpolate(sd_a, sd_b, lam)
        if repair_fn is not None and 0.0 < lam < 1.0:
            sd = repair_fn(sd, float(lam))
        for metric, value in eval_fn(sd).items():
            rows.append({"lam": float(lam), "metric": metric, "value": float(value)})
    return pd.DataFrame(rows)


def barriers(curve: pd.DataFrame, metric: str = "loss") -> dict[str, float]:
    """Both barrier definitions from a curve (needs lam = 0 and lam = 1)."""
    c = curve[curve["metric"] == metric].sort_values("lam")
    lam, v = c["lam"].to_numpy(), c["value"].to_numpy()
    if len(lam) < 2 or lam[0] != 0.0 or lam[-1] != 1.0:
        raise ValidationError(f"a barrier needs the path's endpoints lam=0 and lam=1; got lam={lam.tolist()}")
    sign = -1.0 if metric == "accuracy" else 1.0
    v0, v1 = v[0], v[-1]
    mean = float(np.max(sign * (v - 0.5 * (v0 + v1))))
    linear = float(np.max(sign * (v - ((1 - lam) * v0 + lam * v1))))
    return {"barrier_mean": mean, "barrier_linear": linear}
