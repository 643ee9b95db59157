"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

1. Trim: per task keep the top-k fraction of entries by magnitude (over the
   whole task vector, as in the paper, or per parameter tensor as mergekit
   does: the `scope` knob). Entries tied with the threshold are kept.
2. Elect: each entry's sign is the sign of the sum of the kept values.
3. Disjoint mean: average only the kept, non-zero values whose sign agrees
   with the elected one (entries where none agrees are 0).
The merged delta is α × that. The rule applies to every parameter alike
(vectors and embeddings too), as in the paper.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha

DeltaGetter = Callable[[str], torch.Tensor]   # name -> (T, *shape) float32


def density() -> Hyperparameter:
    return Hyperparameter("density", "float", 0.2, 0.01, 1.0, 0.01,
                          "TIES trim: fraction k of each task's entries kept (largest magnitudes)")


def scope() -> Hyperparameter:
    return Hyperparameter("scope", "choice", "model", help="where the top-k is taken: over the whole task "
                          "vector (paper) or per parameter tensor (mergekit)", choices=("model", "parameter"))


def topk_thresholds(flat_abs: torch.Tensor, k: float) -> torch.Tensor:
    """(T, N) magnitudes -> (T,) the ⌈k·N⌉-th largest value per row."""
    n = flat_abs.shape[1]
    keep = min(n, max(1, math.ceil(k * n - 1e-9)))
    # kthvalue is the `idx`-th smallest; the keep-th largest is the (n-keep+1)-th smallest
    return flat_abs.kthvalue(n - keep + 1, dim=1).values


def model_thresholds(get: DeltaGetter, names: list[str], n_tasks: int, k: float) -> torch.Tensor:
    """(T,) per-task trim thresholds over the whole task vector (TIES' scope).

    Peak memory: T × (number of merged entries) magnitudes at once."""
    flat = torch.cat([get(n).abs().reshape(n_tasks, -1) for n in names], dim=1)
    return topk_thresholds(flat, k)


def ties_group(get: DeltaGetter, names: list[str], n_tasks: int, k: float, a: float, thresholds=None) -> dict:
    """TIES on a group of names; `thresholds` from `model_thresholds`, or None for the per-tensor scope."""
    out = {}
    for name in names:
        tau = get(name)
        thr = thresholds if thresholds is not None else topk_thresholds(tau.reshape(n_tasks, -1).abs(), k)
        out[name] = a * disjoint_merge(tau, thr)
    return out


def disjoint_merge(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(T, *shape) deltas, (T,) trim thresholds -> elected-sign disjoint mean."""
    thr = thresholds.reshape(-1, *([1] * (tau.ndim - 1)))
    trimmed = torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    kept = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    count = agree.sum(0).clamp_min(1)
    return kept.sum(0) / count


def _model_scope(inputs, params, ctx):
    if params["scope"] != "model":
        return None
    return model_thresholds(inputs.deltas, list(inputs.tvs.param_names), len(inputs.tasks), params["density"])


def _ties(group, params, ctx):
    return ties_group(group.deltas, group.names, group.n_tasks, params["density"], params["alpha"], ctx.state)


TIES = MergeMethod(
    "ties", "trim to the top-k entries, elect signs, average the agreeing entries", _ties,
    (density(), alpha(1.0), scope()),
    prepare=_model_scope, peak_memory="scope='model': the magnitudes of every task vector at once (T × N floats)",
    reference="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)")
