"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop both tails, then add.

Per task and per parameter tensor, the entries of the task vector are ranked
by magnitude; the largest `gamma` fraction (outliers) and enough of the
smallest to leave a `density` fraction are masked out, and the merged delta is
α × Σ_t (mask_t ⊙ τ_t), as in Task Arithmetic.

Counts follow mergekit's `breadcrumbs` (N entries in the tensor): keep
⌊density·N⌋, drop the top ⌊gamma·N⌋ and the bottom N − ⌊density·N⌋ − ⌊gamma·N⌋;
when that is negative (gamma > 1 − density) fewer outliers are dropped so that
exactly ⌊density·N⌋ are kept. density = 1 keeps everything (Task Arithmetic).
mergekit's `gamma` is the paper's β (the top fraction); its `lambda` is α here.

Differences from mergekit: with gamma·N < 1 (no outlier dropped) mergekit's
slice `[n_bot:-0]` keeps nothing; here the top of the ranking is kept, as the
formula says. Ties in magnitude are ranked by position (a stable sort), so the
mask is deterministic. Every parameter (vectors and embeddings too) is
sparsified, as in mergekit.
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha


def magnitude_ranks(flat: torch.Tensor) -> torch.Tensor:
    """(T, N) values -> (T, N) positions 0 … N−1 of each |entry| in ascending order (stable)."""
    order = flat.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def breadcrumbs_mask(flat: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """(T, N) task vectors -> (T, N) bool: the entries kept (the middle of each row's magnitude ranking)."""
    n = flat.shape[1]
    if density >= 1.0:
        return torch.ones_like(flat, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - keep - n_top
    if n_bottom < 0:       # gamma > 1 − density: drop fewer outliers to keep exactly `keep`
        n_top += n_bottom
        n_bottom = 0
    ranks = magnitude_ranks(flat)
    return (ranks >= n_bottom) & (ranks < n - n_top)


def _breadcrumbs(group, params, ctx):
    out = {}
    for name in group.names:
        tau = group.deltas(name)
        flat = tau.reshape(tau.shape[0], -1)
        mask = breadcrumbs_mask(flat, params["density"], params["gamma"])
        out[name] = params["alpha"] * torch.where(mask, flat, torch.zeros_like(flat)).sum(0).reshape(tau.shape[1:])
    return out


BREADCRUMBS = MergeMethod(
    "breadcrumbs", "drop each task vector's largest (outliers) and smallest entries per tensor, then add", _breadcrumbs,
    (Hyperparameter("density", "float", 0.9, 0.01, 1.0, 0.01,
                    "fraction of each task's entries kept per tensor, after both tails are dropped"),
     Hyperparameter("gamma", "float", 0.01, 0.0, 0.5, 0.005,
                    "fraction of each task's largest-magnitude entries dropped per tensor (the paper's β)"),
     alpha(0.3)),
    reference="Davari & Belilovsky, Model Breadcrumbs: Scaling multi-task model merging with sparse masks, "
              "ECCV 2024 (arXiv 2312.06795)")
