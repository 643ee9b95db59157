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
from analysis.merging.common import (decomposed, decomposed_ranks, kept_rank, matrix_rank_of, scaled, task_factors,
                                     unscaled_slot)
from analysis.merging.polar import polar, polar_exact, polar_route, times_inverse_sqrt
from analysis.svd import batched_eigh


def tsv_rank(fraction: float, rank: int, n_tasks: int, overflow: str) -> int:
    q = kept_rank(fraction, rank)
    if overflow == "cap" and n_tasks * q > rank:
        q = max(1, rank // n_tasks)
    return q


def kept_ranks(params, tvs, cap: bool = True) -> tuple[tuple[int, int], ...]:
    """((r, q), …): the triplets kept per task, q, for every matrix rank r of the decomposed
    parameters (TSV-M's q when `cap`, with its overflow rule; TSV-C's ⌊f·r⌋ otherwise)."""
    n_tasks = len(tvs.tasks)
    ranks = decomposed_ranks(tvs, params)
    f = params["rank_fraction"]
    if not cap:
        return tuple((r, kept_rank(f, r)) for r in ranks)
    return tuple((r, tsv_rank(f, r, n_tasks, params["overflow"])) for r in ranks)


def _same_tsv_m(params, tvs) -> dict:
    return {**{k: v for k, v in params.items() if k != "rank_fraction"}, "kept": kept_ranks(params, tvs)}


def _same_tsv_c(params, tvs) -> dict:
    return {**{k: v for k, v in params.items() if k != "rank_fraction"}, "kept": kept_ranks(params, tvs, cap=False)}


def _tsv_m_note(params, tvs) -> str | None:
    """Where the cap binds: the rank fraction asks for more triplets than are kept."""
    if params["overflow"] != "cap":
        return None
    capped = [(r, q) for r, q in kept_ranks(params, tvs) if q < kept_rank(params["rank_fraction"], r)]
    if not capped:
        return None
    t = len(tvs.tasks)
    where = ", ".join(f"{q} of rank {r}" for r, q in capped)
    return (f"T·⌊f·r⌋ > r: each task keeps ⌊r/T⌋ triplets ({where}; overflow=cap), so rank fractions above "
            f"about 1/T = {1 / t:.3g} give this same merge.")


def _tsv_m(group, params, ctx):
    a = params["alpha"]
    # keyed by the triplets kept, not f: fractions above the cap share one merge
    slot = unscaled_slot(ctx, "tsv_m", (kept_ranks(params, ctx.inputs.tvs), params["overflow"],
                                        params["include_embeddings"], ctx.polar))
    f, overflow = params["rank_fraction"], params["overflow"]
    if not all(name in slot for name in group.names):
        shape = group.shape(group.names[0])
        m, n, n_tasks = shape[0], int(math.prod(shape[1:])), group.n_tasks
        q = tsv_rank(f, matrix_rank_of(shape), n_tasks, overflow)
        if _grams_serve(ctx, group, q):
            merged = _merged_from_grams(ctx, group, q)
            for i, name in enumerate(group.names):
                slot[name] = merged[i].reshape(group.shape(name))
            return {name: scaled(a, slot[name]) for name in group.names}
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
    return {name: scaled(a, slot[name]) for name in group.names}


def _grams_serve(ctx, group, q: int) -> bool:
    """The Gram-slicing route applies: the Gram polar solver, every name in the SpectralCache with
    its top q kept, and T·q ≤ min(m, n) (U and V tall: no wide polar factor)."""
    cache = ctx.cache
    if polar_route(ctx.polar, ctx.device) != "gram" or cache is None:
        return False
    shape = group.shape(group.names[0])
    r = matrix_rank_of(shape)
    return group.n_tasks * q <= r and all(name in cache.names and q <= cache.kept_rank(name)
                                          for name in group.names)


def task_grams(ctx, name: str, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(UᵀU, VᵀV, p) in float64 for U = [U_1 … U_T], V = [V_1 … V_T] at p = min(K, ⌊r/T⌋)
    directions per task (task-major blocks), computed once per SpectralCache and kept in
    the memo: every TSV-M rank q ≤ p reads its Grams as principal submatrices."""
    cache = ctx.cache
    p = min(cache.kept_rank(name), max(1, matrix_rank_of(ctx.inputs.tvs.shape(name)) // n_tasks))
    key = ("tsv_m_grams", name, p, id(cache), str(ctx.device))
    if key not in ctx.memo:
        u, _, vh = task_factors(ctx, name, p)
        m, n = u.shape[1], vh.shape[2]
        uc = u.permute(1, 0, 2).reshape(m, n_tasks * p).double()
        vc = vh.reshape(n_tasks * p, n).double()
        ctx.memo[key] = (uc.mT @ uc, vc @ vc.mT, p)
    return ctx.memo[key]


# Up to this κ of a TSV-M Gram its eigh may be float32: on the 2-core CPU half the time of a float64 one
# (MKL, 72 Grams of 368²: 0.38 against 0.78 s), at a cost to the merged matrix of 1–2e-8·κ. Largest relative
# error of a whole merge against float64 eighs, by the largest κ among its Grams: quick demo 2.9e-6 at
# κ = 215, 8.4e-6 at 750, 3.4e-5 at 2.1e3, 3.5e-3 at 1.7e5 (the Grams next to the cap ⌊r/T⌋); ViT-12-shaped set
# 4.4e-6 at 247. Up to 500 it adds about 1e-5, an order below the 1e-4 for rank-change solvers.
FLOAT32_EIGH_MAX_KAPPA = 500.0
FLOAT32_EIGH_MIN_SIZE = 256   # below it float32 saves little: 16 Grams of 304², 0.125 → 0.114 s on the two workers


def _kappa_record(ctx, side: str, names) -> list[dict[int, float]]:
    """Per name, {q: κ of its U (side "u") or V ("v") Gram at q triplets per task} seen so far."""
    return [ctx.memo.setdefault(("tsv_m_kappa", side, name, id(ctx.cache)), {}) for name in names]


def nested_gram_eigh(seen: list[dict[int, float]], grams: torch.Tensor, q: int):
    """eigh (float64 out) of a batch of Grams at q triplets per task, each in float32 where its κ is at most
    FLOAT32_EIGH_MAX_KAPPA, and float64 elsewhere; `seen[i]` records κ per q for Gram i and is updated.

    The Gram at q is a principal submatrix of the one at any q' > q (`task_grams`), so by Cauchy interlacing
    its κ is at most κ(q') and at least κ(q'') for q'' < q. A record at or above q within the bound proves
    float32 safe, one at or below q past it proves float64 needed. Otherwise float32 is tried where the
    nearest record is within 4× the bound and kept only if its own κ is (float32 eigenvalues are off by
    ~1e-7·λ_max, so their κ is accurate up to the bound); a Gram never seen takes float64 (a slider starts at
    1/T, where the demo's Grams reach κ = 1e5–1e7). On a CPU only: elsewhere every eigh is float64 (a GPU's
    relative speeds were not measured), and for Grams smaller than FLOAT32_EIGH_MIN_SIZE."""
    bound = FLOAT32_EIGH_MAX_KAPPA
    if grams.device.type != "cpu" or grams.shape[-1] < FLOAT32_EIGH_MIN_SIZE:
        return batched_eigh(grams)
    proven = torch.tensor([any(k <= bound for r, k in s.items() if r >= q) for s in seen], dtype=torch.bool)
    needed = torch.tensor([any(k > bound for r, k in s.items() if r <= q) for s in seen], dtype=torch.bool)
    nearest = [s[min(s, key=lambda r: abs(r - q))] if s else math.inf for s in seen]
    tried = (proven | (~needed & (torch.tensor(nearest, dtype=torch.float64) <= 4 * bound))).nonzero().squeeze(1)
    evals = torch.empty(grams.shape[:-1], dtype=torch.float64)
    evecs = torch.empty_like(grams)
    in32 = torch.zeros(len(seen), dtype=torch.bool)
    if len(tried):
        e32, v32 = batched_eigh(grams[tried].float())
        ok = proven[tried] | (e32[:, -1] <= bound * e32[:, 0].clamp_min(torch.finfo(torch.float32).tiny))
        in32[tried[ok]] = True
        evals[tried[ok]], evecs[tried[ok]] = e32[ok].double(), v32[ok].double()
    if not bool(in32.all()):
        evals[~in32], evecs[~in32] = batched_eigh(grams[~in32])
    tiny64 = torch.finfo(torch.float64).tiny
    for s, ev in zip(seen, evals):
        s[q] = float(ev[-1] / ev[0].clamp_min(tiny64)) if ev[0] > 0 else math.inf
    return evals, evecs


def _merged_from_grams(ctx, group, q: int, rcond: float = 1e-10):
    """TSV-M's merged matrices U⊥ Σ V⊥ᵀ of one shape group (B, m, n).

    polar(U) = U (UᵀU)^(-1/2) and polar(Vᵀ) = (VᵀV)^(-1/2) Vᵀ: the Gram matrices of rank q
    are principal submatrices of the memoised ones (`task_grams`), so a rank change forms
    no Gram; the rest is `polar_gram`'s arithmetic (eigh in float64, or in float32 where κ ≤
    FLOAT32_EIGH_MAX_KAPPA (`nested_gram_eigh`), (·)^(-1/2) applied by
    `times_inverse_sqrt`: in float32 up to κ = 1e6, within 6.7e-6 of a float64 product on the
    quick demo and 1.7e-6 on two ViT blocks, worst matrix; then one float32 product).
    A matrix whose Gram is (near) singular, λ_min ≤ rcond·λ_max, takes `polar_exact` for
    both factors, as `polar_gram` does."""
    n_tasks = group.n_tasks
    gu, gv = [], []
    for name in group.names:
        g_u, g_v, p = task_grams(ctx, name, n_tasks)
        idx = (torch.arange(n_tasks, device=g_u.device)[:, None] * p
               + torch.arange(q, device=g_u.device)).reshape(-1)
        gu.append(g_u[idx][:, idx])
        gv.append(g_v[idx][:, idx])
    evals_u, evecs_u = nested_gram_eigh(_kappa_record(ctx, "u", group.names), torch.stack(gu), q)
    evals_v, evecs_v = nested_gram_eigh(_kappa_record(ctx, "v", group.names), torch.stack(gv), q)
    tiny = torch.finfo(torch.float64).tiny
    bad = torch.zeros(len(group.names), dtype=torch.bool, device=evals_u.device)
    for ev in (evals_u, evals_v):
        bad |= ev[:, 0] <= rcond * ev[:, -1].clamp_min(tiny)
    factors = [task_factors(ctx, name, q) for name in group.names]
    m, n = factors[0][0].shape[1], factors[0][2].shape[2]
    s = torch.stack([fs.reshape(n_tasks * q) for _, fs, _ in factors])
    u = torch.stack([fu.permute(1, 0, 2).reshape(m, n_tasks * q) for fu, _, _ in factors])
    vh = torch.stack([fv.reshape(n_tasks * q, n) for _, _, fv in factors])
    # each polar factor on its own before the float32 product (float32 where the Gram allows,
    # `times_inverse_sqrt`): near the cap the Grams reach κ ~ 1e7, and folding both (·)^(-1/2)
    # into one float32 core matrix cost 6e-3 on the demo
    u_perp = times_inverse_sqrt(u, evals_u, evecs_u)                  # U (UᵀU)^(-1/2)
    vh_perp = times_inverse_sqrt(vh.mT, evals_v, evecs_v).mT          # (VᵀV)^(-1/2) Vᵀ
    merged = (u_perp * s[:, None, :]) @ vh_perp
    if bool(bad.any()):
        merged[bad] = (polar_exact(u[bad]) * s[bad][:, None, :]) @ polar_exact(vh[bad])
    return merged


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
    needs=Needs(spectra=True), covers=decomposed, group_by="shape", same_merge=_same_tsv_m, note=_tsv_m_note,
    peak_memory="one shape-group run's top-q factors and their polar factors, plus the unscaled merged delta of "
                "every matrix (kept in the inputs' memo for α changes), plus, with the Gram polar solver, the "
                "Gram matrices of U and V at ⌊r/T⌋ triplets per task of every matrix (`task_grams`)",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)")

TSV_C = MergeMethod(
    "tsv_c", "each task's own low-rank reconstruction (compression; one delta per task)", _tsv_c,
    (rank_fraction(), include_embeddings()),
    needs=Needs(spectra=True), covers=decomposed, rest=own_delta_rule, per_task=True, same_merge=_same_tsv_c,
    peak_memory="one parameter's top-q factors and its T reconstructions",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)")
