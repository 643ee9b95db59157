"""A 2-D slice of the loss landscape through three parameter sets.

The plane is spanned by A, B, C: origin A, first axis along B - A, second axis
along the part of C - A orthogonal to it (Gram-Schmidt), both unit length, so
distances in the figure are true Euclidean distances in parameter space.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from analysis.errors import ValidationError
from analysis.permutation.barrier import EvalFn
from analysis.permutation.specs import StateDict


def _flat(sd: StateDict, keys: list[str]) -> torch.Tensor:
    return torch.cat([sd[k].detach().float().flatten().cpu() for k in keys])


def plane_basis(sds: Sequence[StateDict]):
    """(keys, origin, e1, e2, coordinates of the three models)."""
    if len(sds) != 3:
        raise ValidationError(f"a plane needs exactly three models, got {len(sds)}")
    keys = sorted(sds[0])
    a, b, c = (_flat(sd, keys) for sd in sds)
    u, v = b - a, c - a
    nu = float(u.norm())
    if nu == 0:
        raise ValidationError("models A and B are identical: they do not span a plane")
    e1 = u / nu
    w = v - (v @ e1) * e1
    nw = float(w.norm())
    if nw < 1e-12 * max(1.0, float(v.norm())):
        raise ValidationError("the three models are collinear: they do not span a plane")
    e2 = w / nw
    coords = [(0.0, 0.0), (nu, 0.0), (float(v @ e1), nw)]
    return keys, a, e1, e2, coords


def _unflat(vec: torch.Tensor, keys: list[str], like: StateDict) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i:i + n].view(like[k].shape)
        i += n
    return out


def loss_plane(sds: Sequence[StateDict], eval_fn: EvalFn, resolution: int = 11, margin: float = 0.25,
               names: Sequence[str] = ("A", "B", "C")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate `eval_fn` on a resolution x resolution grid covering the three
    models (plus `margin` of the span on each side).

    Returns (grid: x, y, metric, value) and (points: model, x, y)."""
    if resolution < 2:
        raise ValidationError(f"resolution must be >= 2, got {resolution}")
    keys, origin, e1, e2, coords = plane_basis(sds)
    xs, ys = [p[0] for p in coords], [p[1] for p in coords]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    gx = np.linspace(min(xs) - margin * span, max(xs) + margin * span, resolution)
    gy = np.linspace(min(ys) - margin * span, max(ys) + margin * span, resolution)
    rows = []
    for x in gx:
        for y in gy:
            sd = _unflat(origin + float(x) * e1 + float(y) * e2, keys, sds[0])
            for metric, value in eval_fn(sd).items():
                rows.append({"x": float(x), "y": float(y), "metric": metric, "value": float(value)})
    points = pd.DataFrame({"model": list(names), "x": xs, "y": ys})
    return pd.DataFrame(rows), points
