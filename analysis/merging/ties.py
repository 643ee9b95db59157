"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

1. Trim: per task keep the top-k fraction of entries by magnitude (over the
   whole task vector, as in the paper, or per parameter tensor as mergekit
   does: the `scope` knob). Entries tied with the threshold are kept. The
   whole-vector threshold comes from an exact streaming selection
   (`analysis.merging.topk`): one parameter at a time, never the T × N
   magnitudes at once, with the same kept set as a concatenation.
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
from analysis.merging.topk import streaming_thresholds

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
    """(T,) per-task trim thresholds over the whole task vector (TIES' scope):
    the ⌈k·N⌉-th largest magnitude of each task, N its entries over `names`.

    Streamed (`analysis.merging.topk`): exactly `topk_thresholds` of the
    concatenated magnitudes, without concatenating them. Peak memory: one
    parameter's T deltas plus a few integer arrays of its size; `get` is
    called twice per name (float32; four times for float64)."""
    return streaming_thresholds(get, names, n_tasks, k)


def memo_thresholds(ctx, config: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Whole-model thresholds kept in the inputs' memo per configuration (the
    knobs they depend on, not α), so an α change re-reads nothing. One entry
    per method tag: a new configuration replaces the last."""
    tag = config[0]
    key = (*config, str(ctx.device))
    for old in [k for k in ctx.memo if isinstance(k, tuple) and k and k[0] == tag and k != key]:
        del ctx.memo[old]
    if key not in ctx.memo:
        ctx.memo[key] = compute()
    return ctx.memo[key]


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
    return memo_thresholds(ctx, ("ties_thresholds", params["density"]), lambda: model_thresholds(
        inputs.deltas, list(inputs.tvs.param_names), len(inputs.tasks), params["density"]))


def _ties(group, params, ctx):
    return ties_group(group.deltas, group.names, group.n_tasks, params["density"], params["alpha"], ctx.state)


TIES = MergeMethod(
    "ties", "trim to the top-k entries, elect signs, average the agreeing entries", _ties,
    (density(), alpha(1.0), scope()),
    prepare=_model_scope,
    peak_memory="one parameter's T deltas (scope='model': the threshold pass streams the model twice before the "
                "merge, holding one parameter's T deltas and integer digits plus T × 65 536 counts; the T "
                "thresholds are kept in the inputs' memo)",
    reference="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)")
