"""EMR-merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024,
"EMR-Merging: tuning-free high-performance model merging", arXiv 2405.17461).

One unified task vector plus a light per-task modulator, over every
parameter (1-D ones included, as the paper):
1. Elect: γ = sign(Σ_t τ_t); per entry, τ_uni = γ · max{|τ_t| : τ_t agrees with γ}
   (0 where no task agrees or the sum is 0).
2. Mask: M_t = (τ_t ⊙ τ_uni > 0), the entries where task t agrees with τ_uni.
3. Rescale: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, sums over the whole task vector.
Task t is scored with λ_t · M_t ⊙ τ_uni: one delta per task, like TSV-C
(`per_task`; `MergeResult.for_task(task)` gives it, so no caller needs a branch).

A single task gives back exactly its task vector (γ = sign τ, τ_uni = τ,
M = (τ ≠ 0), λ = 1).

Differences from the official code (and FusionBench, which follows it),
named: there, sign(0) is −1 (an entry whose task values sum to 0 is elected
negative); we use the paper's sign, so such entries are 0 for every task.
The official rescaler sums the *per-tensor means* of |τ_t| and |M_t ⊙ τ_uni|
(each tensor weighted by 1/its size) instead of the paper's sums over all
entries: `rescaler="tensor_means"` reproduces it, `"entries"` (default) is
the paper's formula. A task whose masked unified vector is all zero
(nothing agrees) gets λ_t = 1 (its delta is zero either way).
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod


def elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, *shape) -> (τ_uni (*shape), masks M_t (T, *shape) bool)."""
    sign = torch.sign(taus.sum(0))
    agree = taus * sign > 0
    unified = sign * torch.where(agree, taus.abs(), torch.zeros_like(taus)).amax(0)
    return unified, taus * unified > 0


def _magnitudes(taus: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task: (Σ|τ_t|, Σ|M_t ⊙ τ_uni|) over one tensor, float64 (means with how='tensor_means')."""
    unified, masks = elect(taus)
    flat = taus.reshape(taus.shape[0], -1).double()
    kept = (masks.reshape(taus.shape[0], -1) * unified.reshape(1, -1).abs()).double()
    own, uni = flat.abs().sum(1), kept.sum(1)
    if how == "tensor_means":
        own, uni = own / flat.shape[1], uni / flat.shape[1]
    return own, uni


def _rescalers(inputs, params, ctx) -> torch.Tensor:
    """(T,) λ_t over the whole task vector (one pass over every parameter)."""
    own = uni = 0.0
    for name in inputs.tvs.param_names:
        o, u = _magnitudes(inputs.deltas(name), params["rescaler"])
        own, uni = own + o, uni + u
    return torch.where(uni > 0, own / torch.where(uni > 0, uni, torch.ones_like(uni)), torch.ones_like(own))


def emr_deltas(taus: torch.Tensor, rescalers: torch.Tensor) -> torch.Tensor:
    """(T, *shape) task vectors, (T,) λ_t -> (T, *shape) per-task deltas λ_t · M_t ⊙ τ_uni."""
    unified, masks = elect(taus)
    scale = rescalers.to(taus.device, taus.dtype).reshape(-1, *[1] * (taus.ndim - 1))
    return scale * masks * unified


def _emr(group, params, ctx):
    return {name: emr_deltas(group.deltas(name), ctx.state) for name in group.names}


EMR = MergeMethod(
    "emr", "one elected unified task vector; each task scored with its own mask and rescaler", _emr,
    (Hyperparameter("rescaler", "choice", "entries", help="λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over all entries (paper), "
                    "or over per-tensor means (the official code)", choices=("entries", "tensor_means")),),
    prepare=_rescalers, per_task=True,
    peak_memory="one parameter's T deltas (the rescalers need one extra pass over the model)",
    reference="Huang et al., EMR-Merging: tuning-free high-performance model merging, NeurIPS 2024 "
              "(arXiv 2405.17461)")
