"""Spherical linear interpolation of two task vectors, per parameter tensor.

With θ the angle between τ_1 and τ_2 (flattened): slerp(t) = sin((1−t)θ)/sinθ · τ_1
+ sin(tθ)/sinθ · τ_2; when the two are (anti)parallel or one is zero the
formula is singular and linear interpolation is used. α scales the result.
"""
from __future__ import annotations

import math

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha


def slerp_pair(v0: torch.Tensor, v1: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    n0, n1 = v0.norm(), v1.norm()
    if float(n0) == 0.0 or float(n1) == 0.0:
        return (1 - t) * v0 + t * v1
    cos = float((v0.flatten() @ v1.flatten()) / (n0 * n1))
    cos = max(-1.0, min(1.0, cos))
    theta = math.acos(cos)
    sin = math.sin(theta)
    if sin < eps:
        return (1 - t) * v0 + t * v1
    return (math.sin((1 - t) * theta) / sin) * v0 + (math.sin(t * theta) / sin) * v1


def _slerp(group, params, ctx):
    t, a = params["t"], params["alpha"]
    out = {}
    for name in group.names:
        tau = group.deltas(name)
        out[name] = a * slerp_pair(tau[0], tau[1], t)
    return out


SLERP = MergeMethod(
    "slerp", "spherical interpolation between exactly two task vectors", _slerp,
    (Hyperparameter("t", "float", 0.5, 0.0, 1.0, 0.05, "interpolation position: 0 = first task, 1 = second"),
     alpha(1.0)),
    needs=Needs(min_tasks=2, max_tasks=2), reference="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985")
