"""Pieces the SVD method families share: which names they decompose, SVD
factors (per task and of the task sum, from the SpectralCache, or the
inputs' memo for names it does not cover) so a knob change never recomputes an SVD, and memo slots that keep
the last unscaled merges so an α change is a scalar multiply (none at α = 1: `scaled`)."""
from __future__ import annotations

import math

import torch

from analysis.spectra import thin_svd, truncation_rank
from analysis.taskvectors import TaskVectorSet, as_matrix



def kept_rank(fraction: float, rank: int) -> int:
    """⌊f·r⌋ singular triplets, at least one: the one rank rule (`analysis.spectra.truncation_rank`)."""
    return truncation_rank(rank, fraction)


def svd_names(tvs: TaskVectorSet, include_embeddings: bool) -> list[str]:
    kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
    return tvs.names_of_kind(*kinds)


def decomposed(tvs: TaskVectorSet, params) -> list[str]:
    """`covers` of the SVD methods: matrices and conv kernels (+ embeddings when asked)."""
    return svd_names(tvs, bool(params.get("include_embeddings", False)))


def task_factors(ctx, name: str, rank: int | None = None):
    """Per-task SVD factors (U (T,m,q), S (T,q), Vh (T,q,n)) of one parameter:
    the top q = `rank` triplets, or all of them (q = min(m, n)) with None.

    From the SpectralCache when it covers `name` (a ValidationError naming
    its K when q exceeds the directions it keeps); otherwise (e.g. embeddings
    asked for but not in the cache) computed once and kept, whole, in the memo."""
    cache = ctx.cache
    if cache is not None and name in cache.names:
        u, s, vh = cache.factors(name) if rank is None else cache.top(name, rank)
        return u.to(ctx.device), s.to(ctx.device), vh.to(ctx.device)
    key = ("task_svd", name)
    if key not in ctx.memo:
        deltas = ctx.inputs.deltas(name)
        ctx.memo[key] = thin_svd(deltas.reshape(deltas.shape[0], deltas.shape[1], -1))
    u, s, vh = ctx.memo[key]
    return (u, s, vh) if rank is None else (u[..., :rank], s[..., :rank], vh[..., :rank, :])


def matrix_rank_of(shape) -> int:
    """min(m, n) of a parameter's matrix view (conv kernels as out × in·k)."""
    return min(int(shape[0]), int(math.prod(shape[1:])))


def decomposed_ranks(tvs: TaskVectorSet, params) -> list[int]:
    """The distinct matrix ranks min(m, n) of the parameters the SVD methods decompose, ascending: what a
    rank rule (TSV's kept triplets, Iso-CTS's split) is applied to when keying a merge."""
    return sorted({matrix_rank_of(tvs.shape(name)) for name in decomposed(tvs, params)})


def sum_factors(ctx, name: str):
    """Thin SVD (U, S, Vh) of Σ_t τ_t for one parameter, computed once.

    From the SpectralCache when it covers `name` (its sum factors are built
    from the task deltas themselves, not the cached truncated factors, and
    kept on disk); otherwise computed once and kept in the memo."""
    cache = ctx.cache
    if cache is not None and name in cache.names:
        u, s, vh = cache.sum_factors(name)
        return u.to(ctx.device), s.to(ctx.device), vh.to(ctx.device)
    key = ("sum_svd", name)
    if key not in ctx.memo:
        ctx.memo[key] = thin_svd(as_matrix(ctx.inputs.deltas(name).sum(0)))
    return ctx.memo[key]


SLOTS_RESIDENT = 3   # unscaled merges kept per method for a resident set: the view's and two neighbours'


def unscaled_slot(ctx, tag: str, config: tuple) -> dict:
    """The memo's {name: unscaled delta} for one method configuration.

    A resident set keeps the SLOTS_RESIDENT most recently used configurations of each method (one model
    copy each, beside the T it keeps): the Merge page merges the neighbouring knob values in the
    background (ui/speculate.py), and evicting the view's own merge for them would make its next α move a
    whole re-merge. A streaming set keeps one (the last), so its memory stays one model copy."""
    key = (tag, config, str(ctx.device))
    inputs = getattr(ctx, "inputs", None)
    tvs = getattr(inputs, "tvs", None)
    keep = SLOTS_RESIDENT if tvs is not None and tvs.is_resident else 1
    slot = ctx.memo.pop(key, None)
    others = [k for k in list(ctx.memo) if isinstance(k, tuple) and k and k[0] == tag]   # oldest first
    for k in others[:max(0, len(others) - (keep - 1))]:
        del ctx.memo[k]
    ctx.memo[key] = slot if slot is not None else {}   # re-inserted last: the most recently used
    return ctx.memo[key]


def scaled(a: float, delta: torch.Tensor) -> torch.Tensor:
    """α · a memoised unscaled delta: the memo's own tensor at α = 1, shared, not copied.

    At α = 1 (TSV-M's and Iso-CTS's default; also task arithmetic's kept sum) the copy was one new
    model-sized tensor per move: 340 MB on ViT-12, whose first touch cost up to 3.5 s of system time on the
    2-core build machine (first-touch faults, docs/results_live.md). So a MergeResult's tensors may be the memo's: consumers never modify
    them in place (`MergeResult`)."""
    return delta if a == 1.0 else a * delta
