"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al., 2024,
"Revisiting weight averaging for model merging", arXiv 2412.12153).

Weight averaging is Task Arithmetic centred at the average: with
τ̄ = mean_t τ_t, θ_avg = θ₀ + τ̄ and θ_t = θ_avg + (τ_t − τ̄). CART keeps the
top singular directions of each *centred* task vector and adds them back:

    δ = τ̄ + λ · Σ_t SVD_k(τ_t − τ̄)          (θ = θ₀ + δ)

per matrix parameter (conv kernels as out × in·k), with k = max(1, ⌊f·r⌋),
r = min(m, n) the layer's full rank (the official code's rank rule).
Every other parameter (biases, norms, embeddings unless
`include_embeddings`) gets τ̄: its full-rank centred sum Σ_t (τ_t − τ̄) is 0,
which is what the official code computes for them.

Known answers (tests): at full rank (f = 1) the centred vectors sum to zero
and CART is weight averaging for every λ; with all task vectors equal it is
that vector; with T = 2 the centred vectors are ±(τ_1 − τ_2)/2, whose
low-rank parts cancel, so CART is the average at every rank.

Defaults: f = 0.08 (the paper's finding that a rank of about 8 % is best
across settings) and λ = 2.0 (the official 8-task ViT-B/32 configuration,
`prior: 2.0`; that configuration itself sets the rank ratio to 0.12, and the
20-task one λ = 1.9 with 0.32: both are tuned per benchmark). Differences
from the official code, named: it decomposes only attention and MLP weights
(names containing "attn"/"mlp"); we decompose every matrix and conv kernel,
as our other SVD methods do. λ is not a global scale (τ̄ is not multiplied),
so CART is not linear in λ: an α grid cannot reuse one merge.

Speed: the unscaled low-rank sums are memoised per (f, include_embeddings),
so a change of λ is one multiply-add per parameter.
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, include_embeddings
from analysis.merging.common import decomposed, kept_rank, unscaled_slot
from analysis.spectra import thin_svd


def low_rank_centred_sum(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """(T, m, n) task matrices -> (m, n): Σ_t SVD_k(τ_t − τ̄), k = max(1, ⌊f·min(m, n)⌋)."""
    u, s, vh = thin_svd(taus - taus.mean(0, keepdim=True))
    k = kept_rank(fraction, s.shape[-1])
    return ((u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]).sum(0)


def _cart(group, params, ctx):
    f, lam = params["rank_fraction"], params["lam"]
    slot = unscaled_slot(ctx, "cart", (f, params["include_embeddings"]))
    out = {}
    for name in group.names:
        taus = group.deltas(name)
        if name not in slot:
            slot[name] = low_rank_centred_sum(taus.reshape(taus.shape[0], taus.shape[1], -1), f).reshape(
                group.shape(name))
        out[name] = taus.mean(0) + lam * slot[name]
    return out


CART = MergeMethod(
    "cart", "the average plus λ × the summed low-rank parts of the task vectors centred on it", _cart,
    (Hyperparameter("rank_fraction", "float", 0.08, 0.005, 1.0, 0.005,
                    "fraction f of each layer's rank r kept per centred task vector: max(1, ⌊f·r⌋) "
                    "singular triplets (the paper: about 8 %)"),
     Hyperparameter("lam", "float", 2.0, 0.0, 5.0, 0.05,
                    "λ: scale of the summed low-rank centred task vectors (δ = τ̄ + λ·Σ_t SVD_k(τ_t − τ̄))"),
     include_embeddings()),
    covers=decomposed,
    peak_memory="one parameter's T deltas and their SVD, plus the unscaled low-rank sum of every matrix (kept in "
                "the inputs' memo so a λ change recomputes nothing)",
    reference="Choi et al., Revisiting weight averaging for model merging (CART), arXiv 2412.12153")
