"""Pieces every method family shares: reading stacked deltas onto the device,
the vector rule, and SVD factors (per task from the SpectralCache, of the task
sum from a per-cache memo), so a knob change never recomputes an SVD."""
from __future__ import annotations

import math

import torch

from analysis.spectra import thin_svd
from analysis.taskvectors import TaskVectorSet, as_matrix


def stacked(tvs: TaskVectorSet, name: str, device) -> torch.Tensor:
    """(T, *shape) float32 deltas of one parameter on `device`."""
    return tvs.deltas(name).to(device, torch.float32)


def vector_rule(tvs: TaskVectorSet, name: str, alpha: float, device) -> torch.Tensor:
    """α × mean over tasks: what 1-D parameters (and anything an SVD method
    does not decompose) receive."""
    return alpha * stacked(tvs, name, device).mean(0)


def svd_names(tvs: TaskVectorSet, include_embeddings: bool) -> list[str]:
    kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
    return tvs.names_of_kind(*kinds)


def kept_rank(fraction: float, rank: int) -> int:
    """⌊f·r⌋ singular triplets, at least one (f > 0 is declared)."""
    return max(1, int(math.floor(fraction * rank + 1e-9)))


def task_factors(tvs: TaskVectorSet, ctx, name: str):
    """Per-task SVD factors (U (T,m,r), S (T,r), Vh (T,r,n)) of one parameter.

    From the SpectralCache when it covers `name`; otherwise (e.g. embeddings
    asked for but not in the cache) computed once and kept in the memo."""
    cache = ctx.cache
    if cache is not None and name in cache.names:
        u, s, vh = cache.factors(name)
        return u.to(ctx.device), s.to(ctx.device), vh.to(ctx.device)
    key = ("task_svd", name)
    if key not in ctx.memo:
        mats = torch.stack([as_matrix(d) for d in stacked(tvs, name, ctx.device)])
        ctx.memo[key] = thin_svd(mats)
    return ctx.memo[key]


def sum_factors(tvs: TaskVectorSet, ctx, name: str):
    """Thin SVD (U, S, Vh) of Σ_t τ_t for one parameter, computed once per cache.

    Built from the task deltas themselves (not the truncated cached factors),
    so it is exact whatever the cache holds."""
    key = ("sum_svd", name)
    if key not in ctx.memo:
        total = as_matrix(stacked(tvs, name, ctx.device).sum(0))
        ctx.memo[key] = thin_svd(total)
    return ctx.memo[key]


def shape_groups(tvs: TaskVectorSet, names: list[str]) -> dict[tuple, list[str]]:
    """Names grouped by their matrix shape, so same-shaped layers are solved in one batch."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        shape = tvs.shape(name)
        mshape = (shape[0], int(math.prod(shape[1:])))
        groups.setdefault(mshape, []).append(name)
    return groups


def forget(memo: dict, tag: str) -> None:
    """Drop the memo entries of one kind (keys are tuples starting with `tag`)."""
    for key in [k for k in memo if isinstance(k, tuple) and k and k[0] == tag]:
        del memo[key]
