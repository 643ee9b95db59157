"""Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

TSV-M, per matrix parameter (conv kernels as out × in·k):
  each task keeps its top q = ⌊f·r⌋ singular triplets (r = min(m, n));
  U = [U_1 … U_T] (m × Tq), Σ = blockdiag(Σ_1 … Σ_T), V = [V_1 … V_T] (n × Tq);
  U, V are replaced by their polar factors U⊥, V⊥ (nearest orthonormal
  matrices, `analysis.merging.polar`); delta = α · U⊥ Σ V⊥ᵀ.

When T·q > r (f > 1/T) at least one of U, V is wider than tall and has no
nearest matrix with orthonormal *columns*: at most r directions can be
mutually orthogonal. The `overflow` knob says what happens then:
  "cap"   (default) q is lowered to ⌊r/T⌋ (at least 1), so T·q ≤ r and the
          merged delta's SVD is exactly U⊥ Σ V⊥ᵀ: the TSV-M guarantee
          (no interference between the tasks' kept subspaces) holds; raising
          f above 1/T then changes nothing.
  "polar" keep q = ⌊f·r⌋ and use the polar factor of the wide matrix, which
          has orthonormal *rows* (a partial isometry of rank m or n, the
          nearest such matrix); the singular directions overlap, so the
          result is no longer an SVD and Σ is mixed.
(If T > r even q = 1 overflows; the polar rule is then used in both modes.)

Vector parameters, and embeddings unless `include_embeddings`: α × mean.

TSV-C: each task's own rank-⌊f·r⌋ reconstruction (the compression view).
It returns one delta per task: {task: {param: delta}}; parameters that are
not decomposed keep the task's full delta.

Both read only the top q triplets per task from the SpectralCache, so a cache
keeping K directions (`analysis.spectra`, `keep`) serves every q ≤ K; a larger
q is a ValidationError naming K. With overflow="cap" TSV-M reads at most
⌊r/T⌋ per task, so the default cache serves it at every rank fraction.
Memory: one shape-group run's top-q factors and polar factors at a time, plus
the unscaled merged delta of every matrix (kept in the inputs' memo so an α
change is a multiply).
"""
from __future__ import annotations

import math

import torch

from analysis.merging.base import (Hyperparameter, MergeMethod, Needs, alpha, include_embeddings, own_delta_rule,
                                   rank_fraction)
from analysis.merging.common import decomposed, kept_rank, matrix_rank_of, task_factors, unscaled_slot
from analysis.merging.polar import polar


def tsv_rank(fraction: float, rank: int, n_tasks: int, overflow: str) -> int:
    q = kept_rank(fraction, rank)
    if overflow == "cap" and n_tasks * q > rank:
        q = max(1, rank // n_tasks)
    return q


def _tsv_m(group, params, ctx):
    f, a, overflow = params["rank_fraction"], params["alpha"], params["overflow"]
    slot = unscaled_slot(ctx, "tsv_m", (f, overflow, params["include_embeddings"], ctx.polar))
    if not all(name in slot for name in group.names):
        shape = group.shape(group.names[0])
        m, n, n_tasks = shape[0], int(math.prod(shape[1:])), group.n_tasks
        q = tsv_rank(f, matrix_rank_of(shape), n_tasks, overflow)
        factors = [task_factors(ctx, name, q) for name in group.names]   # only the q triplets used
        # (B, m, T·q): task-major column blocks [U_1 … U_T]
        u = torch.stack([fu[:, :, :q].permute(1, 0, 2).reshape(m, n_tasks * q) for fu, _, _ in factors])
        s = torch.stack([fs[:, :q].reshape(n_tasks * q) for _, fs, _ in factors])
        vh = torch.stack([fv[:, :q, :].reshape(n_tasks * q, n) for _, _, fv in factors])
        u_perp = polar(u, ctx.polar)
        vh_perp = polar(vh, ctx.polar)   # polar(Vᵀ) = polar(V)ᵀ
        merged = (u_perp * s[:, None, :]) @ vh_perp
        for i, name in enumerate(group.names):
            slot[name] = merged[i].reshape(group.shape(name))
    return {name: a * slot[name] for name in group.names}


def _tsv_c(group, params, ctx):
    out = {}
    for name in group.names:
        q = kept_rank(params["rank_fraction"], matrix_rank_of(group.shape(name)))
        u, s, vh = task_factors(ctx, name, q)
        recon = (u[:, :, :q] * s[:, None, :q]) @ vh[:, :q, :]
        out[name] = recon.reshape(recon.shape[0], *group.shape(name))
    return out


TSV_M = MergeMethod(
    "tsv_m", "keep each task's top singular triplets, orthogonalise U and V across tasks (polar factor)", _tsv_m,
    (rank_fraction(), alpha(1.0),
     Hyperparameter("overflow", "choice", "cap", help="when T·⌊f·r⌋ > r: cap the rank at ⌊r/T⌋, or keep it and "
                    "use the wide polar factor (orthonormal rows)", choices=("cap", "polar")),
     include_embeddings()),
    needs=Needs(spectra=True), covers=decomposed, group_by="shape",
    peak_memory="one shape-group run's top-q factors and their polar factors, plus the unscaled merged delta of "
                "every matrix (kept in the inputs' memo for α changes)",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)")

TSV_C = MergeMethod(
    "tsv_c", "each task's own low-rank reconstruction (compression; one delta per task)", _tsv_c,
    (rank_fraction(), include_embeddings()),
    needs=Needs(spectra=True), covers=decomposed, rest=own_delta_rule, per_task=True,
    peak_memory="one parameter's top-q factors and its T reconstructions",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)")
