"""Model Stock (Jang et al., ECCV 2024): interpolate towards the mean by the task vectors' angle.

"Model Stock: All we need is just a few fine-tuned models" (arXiv 2403.19522),
with mergekit's `model_stock` conventions. Per parameter tensor, with k tasks:
cos θ = the mean over task pairs of cos(τ_i, τ_j) (mergekit's reading of the
paper's single θ for k > 2),
t = k·cos θ / (1 + (k − 1)·cos θ),
merged = t · mean(w_ft) + (1 − t) · w_0, i.e. the delta t · mean_t τ_t (× α).
Identical task vectors give t = 1 (their mean); two orthogonal ones t = 0 (the
pre-trained weights). `filter_wise` takes θ and t per row (matrix rows, conv
output filters; a vector is one row) instead of per tensor.

Differences from mergekit: mergekit clamps each norm product at 1e-6 before
dividing, which biases cos θ towards 0 for the small deltas of fine-tuning
(|τ_i|·|τ_j| < 1e-6 is common for a bias); here cos is exact and only a zero
task vector counts as orthogonal to everything. Where 1 + (k − 1)·cos θ = 0
(unit vectors summing to zero) t is 0 instead of a division by zero; a
negative cos θ gives a negative t, as in mergekit. mergekit's `filter_wise`
takes rows along a conv kernel's last axis; here a row is a whole output filter.
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha


def mean_pairwise_cosine(rows: torch.Tensor) -> torch.Tensor:
    """(k, R, n) -> (R,) mean over pairs i < j of cos(row_i, row_j), float64 (0 against a zero row)."""
    x = rows.double()
    gram = torch.einsum("irn,jrn->rij", x, x)                       # (R, k, k)
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()       # (R, k)
    denom = norms[:, :, None] * norms[:, None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    k = rows.shape[0]
    off = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)     # Σ_{i≠j} cos
    return (off / (k * (k - 1))).clamp(-1.0, 1.0)


def interpolation_ratio(cos: torch.Tensor, k: int) -> torch.Tensor:
    """t = k·cos / (1 + (k−1)·cos), 0 where the denominator vanishes."""
    denom = 1.0 + (k - 1) * cos
    safe = torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
    return torch.where(denom.abs() > 1e-12, k * cos / safe, torch.zeros_like(cos))


def _model_stock(group, params, ctx):
    out = {}
    for name in group.names:
        tau = group.deltas(name)
        k = tau.shape[0]
        if params["filter_wise"] and tau.ndim > 2:
            rows = tau.reshape(k, tau.shape[1], -1)
        else:
            rows = tau.reshape(k, 1, -1)
        t = interpolation_ratio(mean_pairwise_cosine(rows), k).to(tau.dtype)    # (R,)
        out[name] = params["alpha"] * (t[:, None] * rows.mean(0)).reshape(tau.shape[1:])
    return out


MODEL_STOCK = MergeMethod(
    "model_stock", "mean task vector × t(θ): t = 1 for identical task vectors, 0 for two orthogonal ones",
    _model_stock,
    (Hyperparameter("filter_wise", "bool", False,
                    help="one angle per row (output filter) instead of one per tensor (mergekit: not recommended)"),
     alpha(1.0)),
    needs=Needs(min_tasks=2),
    reference="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv 2403.19522)")
