"""Isotropic merging (Marczak et al., ICML 2025, "No task left behind").

Iso-C, per matrix parameter: M = Σ_t τ_t = U S Vᵀ; delta = α · mean(S) · U Vᵀ
(the sum's singular directions, with a flat spectrum). U, S, V are the
thin SVD restricted to the sum's numerical rank (σ > σ_1·max(m, n)·ε_float32,
numpy's matrix_rank rule): on a full-rank sum (every real case) that is the
whole thin SVD, and on a rank-deficient one the output keeps the sum's span
instead of inventing directions for zero singular values.

Iso-CTS, per matrix parameter (r = min(m, n)):
  the rank split of the published code (Marczak et al.'s `iso_cts`):
  s = round((r − int(c·r))/T) directions per task (Python's round, halves to
  even; int truncates), common = r − T·s, so common + T·s = r always and the
  common size moves from ⌊c·r⌋ by at most T/2, either way (below T under
  the cap that follows). E.g. r = 384,
  T = 8, c = 0.8: int(307.2) = 307, round(77/8) = 10, common = 304.
  Where rounding up would give the tasks more than r directions (T·s > r,
  small c: r = 28, T = 8, c = 0 rounds 3.5 up to 4) the published code takes
  a negative common size and fails; here s is capped at ⌊r/T⌋ (common ≥ 0).
  So U*, V* below always have exactly r columns (never more than rows: their
  polar factors have orthonormal columns) and no task takes more directions
  than its projected residual has (s ≤ r − common).
  The `split` knob's other rule, "exact_fill", never puts common below ⌊c·r⌋:
  s = ⌊(r − ⌊c·r⌋)/T⌋, common = r − T·s.
  Then: common subspace: the sum's top `common` triplets (U_c, S_c, V_c);
  task t: the top s triplets of (I − U_c U_cᵀ) τ_t (common subspace projected out);
  concatenate U* = [U_c, X_1 … X_T], V* likewise (m × r, n × r), replace them
  by their polar factors (every X_t is orthogonal to U_c by construction, so
  polar(U*) = [U_c, polar([X_1 … X_T])]: only the m × T·s block is solved), set every singular value to the mean of the
  concatenated ones (S_c and each task's s values): delta = α · mean · U⊥ V⊥ᵀ.
  With c = 1, s = 0 and this is Iso-C exactly (the common block is cut to the
  sum's numerical rank as in Iso-C).

Vector parameters, and embeddings unless `include_embeddings`: α × mean.

Memory: one shape-group run's deltas and factors at a time, plus the sum's
SVD of every matrix (the SpectralCache's `sum_factors`, kept whole: Iso-C
reads every direction) and the unscaled merged delta of every matrix (kept in
the inputs' memo so an α change is a multiply), plus `task_projections` of every
matrix the cached factors serve (W_t = U_sumᵀU_tS_t, and for tall matrices the
Gram of τ_t outside the sum's column space: at most half the memory of the per-task factors), so a change
of c forms no m-sized product: on the quick demo a c move took 1.88 s against
2.64 s before, median of 4 (2-core CPU, benchmarks/remerge_moves.py). Keeping the
tall matrices' Gram outside the sum's column space (so a move adds r_sum − common
rows, not subtracts common) and a full eigh for the small Grams on a CPU
(`top_k_eigh`) took it from 1.75 to 1.55 s, median of 6, same run. Matrices the
cached factors do not serve (a truncated cache) read their deltas instead; a
resident set keeps, for its tall ones, `outside_parts` (W = U_sumᵀτ_t and G_out:
T·n·(n + r_sum) floats, at most 2n/m of the deltas it also keeps). On the CPU's
polar route ("gram") a resident set also keeps every matrix's sum's right Gram
V_sumᵀV_sum (r² float64: 226 MB on ViT-12, 42 MB on the quick demo), the common
block of every V*'s Gram (`_v_polar`).

Speed: the sum's SVD is memoised per SpectralCache; a change of c only needs
the top-s triplets of the projected task matrices, computed from the cached
per-task factors τ_t = U_t S_t V_tᵀ: (I − P_c) τ_t = B_t V_tᵀ with
B_t = (I − P_c) U_t S_t. For m ≤ n the sum's U is square and I − P_c = U_⊥U_⊥ᵀ,
so only the small (r − common) × r matrix U_⊥ᵀ B_t needs an SVD; for m > n the
top eigenpairs of the r × r Gram matrix B_tᵀB_t are taken in float64 (so
squaring the condition number costs no accuracy at float32 output). That
needs every per-task direction: when the SpectralCache keeps only the top K
(`analysis.spectra`, large matrices by default) the same Grams are formed from
the deltas instead (`projected_top_of_deltas`: U_⊥ᵀτ_t per move for wide and
square matrices; for tall ones U_sumᵀτ_t and the Gram outside the sum's column
space, kept for resident sets, so a move slices rows), as
fast per c change on two ViT blocks as the factor route, same result up to
rounding.
With merge(topk="subspace"), and "auto" on CUDA, those top-s triplets come from block
subspace iteration (`analysis.svd.top_k_eigh`: batched matmuls and Cholesky
factors, small Rayleigh–Ritz problems, exact eigh as the fallback) on the
float64 Gram matrices, B_tᵀB_t for m > n and (U_⊥ᵀB_t)(U_⊥ᵀB_t)ᵀ for m ≤ n,
every parameter of a shape-group run and every task in one call: cuSOLVER's
full eigh / SVD of many small matrices is latency-bound, and so is a loop of
small calls. "auto" takes it on CUDA only. On a CPU it takes topk="exact",
LAPACK: `top_eigh_exact` computes only the top s eigenpairs by MRRR where
that pays (`analysis.svd._mrrr_pays`: s ≤ n/5 over the worker threads; else a
full eigh). On the 2-core CPU the tall ViT-block Grams (768 × 768 float64,
s = 10 to 38, T = 8) took 19–29 ms each by MRRR one at a time against 55–65 ms
by subspace iteration and 55–62 ms by a full eigh, and two ViT blocks' c moves
3.73 / 3.02 / 4.69 → 3.17 / 2.49 / 3.55 s (c = 0.7 / 0.9 / 0.6, resident set,
keep="auto"). Since the MRRR runs over the two workers (the GIL-free binding of
`analysis.lapack`), 18 ms per matrix at s = 23, and two ViT blocks' moves
2.89 / 2.32 / 3.56 and 2.85 / 2.11 / 3.49 s → 2.34 / 1.82 / 2.56 and 2.57 /
1.84 / 2.46 s (benchmarks/iso_cts_floor.py, back to back, 2026-12-07). Before MRRR, subspace
iteration had measured 2.3–2.6 s against 3.0–3.4 s for the full eigh on one
ViT block (c = 0.5 / 0.8 / 0.95). Each task's rank-s projected part by the
subspace route was within 1e-10 to 1.1e-5 of the full route there (tests).
Both solvers decompose the same float64 Grams, for the square and wide
matrices too: "exact" there once took a float32 SVD of U_⊥ᵀB_t, which was the
farther of the two from a float64 reference, and on the quick demo 0.48 s a
move against 0.10 s through the Gram.
"""
from __future__ import annotations

import math

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha, include_embeddings
from analysis.merging.common import (decomposed, decomposed_ranks, scaled, sum_factors, task_factors,
                                     unscaled_slot)
from analysis.merging.polar import polar, polar_gram, polar_route
from analysis.svd import _exact_matmul, top_eigh_exact, top_k_eigh


def _iso_c(group, params, ctx):
    out = {}
    for name in group.names:
        u, s, vh = sum_factors(ctx, name)
        k = numerical_rank(s, u.shape[0], vh.shape[1])
        out[name] = (params["alpha"] * s[:k].mean()) * (u[:, :k] @ vh[:k]).reshape(group.shape(name))
    return out


def numerical_rank(s: torch.Tensor, m: int, n: int) -> int:
    """Number of singular values above σ_1·max(m, n)·ε (float32); at least 1."""
    if s.numel() == 0:
        return 0
    tol = float(s[0]) * max(m, n) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


SPLIT_RULES = ("published", "exact_fill")


def split_rank(rank: int, n_tasks: int, common_fraction: float, rule: str = "published") -> tuple[int, int]:
    """(common, per_task) with common + n_tasks·per_task = rank (see the module docstring).

    "published": per_task = round((rank − int(c·rank))/T), capped at ⌊rank/T⌋,
    the arithmetic of the authors' code; "exact_fill": ⌊(rank − ⌊c·rank⌋)/T⌋."""
    if rank < 0 or n_tasks < 1 or not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"split_rank: need rank >= 0, n_tasks >= 1, 0 <= common_fraction <= 1; "
                         f"got rank={rank!r}, n_tasks={n_tasks!r}, common_fraction={common_fraction!r}")
    if rule == "published":
        per_task = min(round((rank - int(rank * common_fraction)) / n_tasks), rank // n_tasks)
    elif rule == "exact_fill":
        per_task = (rank - int(math.floor(common_fraction * rank + 1e-9))) // n_tasks
    else:
        raise ValueError(f"split_rank: rule {rule!r} is not one of {list(SPLIT_RULES)}")
    return rank - n_tasks * per_task, per_task


def split_ranks(params, tvs) -> tuple[tuple[int, int, int], ...]:
    """((r, common, per_task), …) for every matrix rank r of the decomposed parameters: what an Iso-CTS
    merge depends on, not c itself. Neighbouring c often give the same split: on the quick demo every matrix
    has r = 384 and T = 8, and a 0.01 step moves round((r − ⌊c·r⌋)/T) about every second step (0.79 and 0.8
    both give common 304, 10 per task), so such steps share one merge and its caches (`same_merge`)."""
    n_tasks = len(tvs.tasks)
    return tuple((r, *split_rank(r, n_tasks, params["common_fraction"], params["split"])) for r in decomposed_ranks(tvs, params))


def _same_iso_cts(params, tvs) -> dict:
    return {**{k: v for k, v in params.items() if k != "common_fraction"}, "splits": split_ranks(params, tvs)}


def task_projections(u_t, s_t, u_sum) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `projected_top` needs of τ_t's factors at every common size, computed once:
    W_t = U_sumᵀ U_t S_t (..., T, r_sum, r) and, for tall matrices (U_sum not square),
    G_out = (U_t S_t)ᵀ(U_t S_t) − W_tᵀW_t (..., T, r, r), the Gram of τ_t's part outside the
    sum's column space (formed in float64; else None). The projected residual's Gram at any
    common size is then G_out + W_⊥ᵀW_⊥ with W_⊥ = W_t's rows past `common`: r_sum − common
    rows per move instead of common. float32, both together at most half the memory of the
    factors they come from (r ≤ (m + n)/2); G_out is stored after the subtraction, so its
    rounding is relative to itself, not to the larger Gram it came from."""
    us = u_t * s_t[..., None, :]
    w = u_sum.unsqueeze(-3).mT @ us
    if u_sum.shape[-1] == u_t.shape[-2]:
        return w, None
    usd, wd = us.double(), w.double()
    return w, (usd.mT @ usd - wd.mT @ wd).float()


def projected_top(u_t, s_t, vh_t, u_sum, common: int, k: int, solver: str = "exact", proj=None):
    """Top-k SVD triplets of (I − U_c U_cᵀ) τ_t for every task, from τ_t's factors.

    u_t (..., T, m, r), s_t (..., T, r), vh_t (..., T, r, n); u_sum (..., m, r_sum) the
    sum's left vectors (leading dims: several parameters of one shape at once).
    solver: how the top eigenpairs of the smaller float64 Gram matrix are taken: "exact"
    (LAPACK, `top_eigh_exact`) or "subspace" (`analysis.svd.top_k_eigh`, exact fallback;
    module doc: Speed).
    proj: `task_projections(u_t, s_t, u_sum)`, kept by the caller across common sizes: the
    m-sized products then become slices (square U_sum: U_⊥ᵀU_tS_t is rows of W_t; tall: the
    projected residual's Gram is G_out + W_⊥ᵀW_⊥, formed in float64). With proj, u_t and vh_t
    may also be lists of one leading index's factors each (`_projected` passes the cache's own
    tensors: stacking them copied 486 MiB per quick-demo move).
    Returns X (..., T, m, k), σ (..., T, k), Yh (..., T, k, n)."""
    m = u_sum.shape[-2]
    us = _stacked(u_t) * s_t[..., None, :] if proj is None else None   # U_t S_t  (..., T, m, r)
    u_sum = u_sum.unsqueeze(-3)                      # (..., 1, m, r_sum): the same for every task
    u_c = u_sum[..., :common]
    if u_sum.shape[-1] == m:                         # square U: I − P_c = U_⊥ U_⊥ᵀ
        u_perp = u_sum[..., common:]                 # (..., 1, m, m − common)
        # (..., T, m − common, r), m − common ≤ r
        small = proj[0][..., common:, :] if proj is not None else u_perp.mT @ us
        xs, sig, y_h = _top_of_rows(small, k, solver)   # its float64 row Gram, either solver
        x = u_perp @ xs
    elif proj is not None:                           # tall, τ_t in the coordinates of V_t: τ_tE ≅ U_t(S_tE)
        x, sig, y_h = _tall_top(proj[0], proj[1], lambda e32: each_times(u_t, s_t[..., :, None] * e32),
                                u_c.squeeze(-3), common, k, solver)
    else:                                            # tall: Gram route in float64
        b = us - u_c @ (u_c.mT @ us)                 # (..., T, m, r)
        evals, evecs = _top_eigh((b.mT @ b).double(), k, solver)   # descending
        sig = evals.clamp_min(0).sqrt()
        x = (b.double() @ evecs) / sig.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
        x, sig, y_h = x.float(), sig.float(), evecs.mT.float()
    return x, sig, each_times(y_h, vh_t)            # right vectors: (V_t Y)ᵀ = Yᵀ V_tᵀ


def _stacked(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.stack(list(t))


def each_times(left, right) -> torch.Tensor:
    """left @ right, where one of them may be a list with one tensor per leading index (the other's
    first dim): the products are taken item by item and only the (smaller) results stacked."""
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        return left @ right
    return torch.stack([a @ b for a, b in zip(left, right, strict=True)])


def outside_parts(taus: torch.Tensor, u_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, G_out) of tall task matrices (T, m, n), m > n, what no common size changes:
    W = U_sumᵀτ_t (T, r_sum, n), each τ_t in the sum's column space (a move slices its rows), and
    G_out = τ_tᵀ(I − U_sumU_sumᵀ)τ_t = τ_tᵀτ_t − WᵀW (T, n, n), the Gram of τ_t outside it; both formed
    in float64 and stored in float32 (G_out after the subtraction, so its rounding is relative to itself)."""
    x = taus.reshape(taus.shape[0], taus.shape[1], -1).double()
    w = u_sum.double().mT @ x
    return w.float(), (x.mT @ x - w.mT @ w).float()


def projected_top_of_deltas(taus: torch.Tensor, u_sum, common: int, k: int, solver: str = "exact",
                            outside: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Top-k SVD triplets of (I − U_c U_cᵀ) τ_t for every task, from the task matrices themselves
    (T, m, n): the route when the SpectralCache keeps fewer than all of τ_t's singular directions,
    which `projected_top` needs. The same arithmetic as `projected_top`, on the deltas:
    - m ≤ n (U_sum square): (I − P_c)τ_t = U_⊥W_⊥ with W_⊥ = U_⊥ᵀτ_t ((m − common) × n), so
      only W_⊥ W_⊥ᵀ ((m − common)², float64) is decomposed;
    - m > n: the Gram of (I − P_c)τ_t is G_out + W_⊥ᵀW_⊥ (n × n, float64) with `outside` =
      (W, G_out) = `outside_parts` (pass it when kept across common sizes: then a move forms
      nothing m·n-sized but τ_tE and U_c(W_cE)); left vectors X = (I − P_c)τ_t E / σ in float32,
      as on the factor route.
    solver: "exact" (LAPACK, `top_eigh_exact`) or "subspace" (`top_k_eigh`). This replaced a full
    float32 SVD of every (I − P_c)τ_t per move: two ViT-B/32-shaped blocks (benchmarks/merge.py's
    set), T = 8, keep="auto", c 0.8 → 0.7 / 0.9 took 14.9 / 14.0 s before and 3.95 / 2.98 s after,
    on the 2-core CPU; the factor route with keep="full" took 3.85 / 3.00 s in the same run."""
    t = taus.shape[0]
    x = taus.reshape(t, taus.shape[1], -1)
    m = x.shape[-2]
    u_perp = u_sum[:, common:]
    if u_sum.shape[-1] == m:                              # square U: (I − P_c)τ = U_⊥ W_⊥
        with _exact_matmul():
            w_perp = u_perp.mT @ x                        # (T, m − common, n)
        xs, sig, y_h = _top_of_rows(w_perp, k, solver)
        return u_perp @ xs, sig, y_h
    w, g_out = outside if outside is not None else outside_parts(taus, u_sum)
    return _tall_top(w, g_out, lambda e32: x @ e32, u_sum[:, :common], common, k, solver)


def _tall_top(w, g_out, tau_times, u_c, common: int, k: int, solver: str):
    """Top-k triplets (X, σ, Eᵀ) of (I − U_cU_cᵀ)τ_t for tall τ_t, from what no common size changes,
    in whichever right coordinates q τ_t is held (its own columns, or V_t's on the factor route):
    W = U_sumᵀτ_t (..., T, r_sum, q) and G_out (..., T, q, q). The residual's Gram is G_out + W_⊥ᵀW_⊥
    (float64, r_sum − common rows added per move), E its top eigenvectors, σ = √λ, and
    X = (τ_tE − U_c(W_cE)) / σ with τ_tE = tau_times(E) in float32, as the residual itself would be.
    u_c (..., m, common) is the same for every task."""
    wd = w[..., common:, :].double()                      # W_⊥ = U_⊥ᵀτ_t
    evals, e = _top_eigh((wd.mT @ wd).add_(g_out), k, solver)   # descending; G_out added in place, no float64 copy
    sig = evals.clamp_min(0).sqrt()
    with _exact_matmul():
        e32 = e.float()
        b_e = tau_times(e32) - times_each_task(u_c, w[..., :common, :] @ e32)   # U_cᵀτ_t = W_c
    x = b_e.double() / sig.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
    return x.float(), sig.float(), e.mT.float()


def times_each_task(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left (..., m, c) times each task's right[..., t, :, :] (..., T, c, k): (..., T, m, k), as one product
    with the tasks' k columns side by side. The broadcast batched product of T skinny matrices it replaces
    took 41 ms against 3.4 ms on the quick demo's tall matrices (6 × 8 of 1536 × 304 by 304 × 10)."""
    *lead, t, c, k = right.shape
    cols = right.movedim(-3, -2).reshape(*lead, c, t * k)
    return (left @ cols).reshape(*lead, left.shape[-2], t, k).movedim(-2, -3)


def _top_eigh(gram: torch.Tensor, k: int, solver: str):
    """The k largest eigenpairs (descending) of float64 Gram matrices, by `solver`."""
    return top_k_eigh(gram, k) if solver == "subspace" else top_eigh_exact(gram, k)


def _top_of_rows(small: torch.Tensor, k: int, solver: str):
    """Top-k SVD triplets (X, σ, Yᵀ) of short matrices small (..., p, q), p ≤ q, through the float64
    Gram small·smallᵀ (p × p): X its top eigenvectors, σ = √λ, Yᵀ = Xᵀ small / σ; float32 out."""
    sd = small.double()
    evals, xs = _top_eigh(sd @ sd.mT, k, solver)
    sig = evals.clamp_min(0).sqrt()
    y_h = (xs.mT @ sd) / sig.clamp_min(torch.finfo(torch.float64).tiny)[..., :, None]
    return xs.float(), sig.float(), y_h.float()


def _projected(ctx, names: list[str], common: int, k: int) -> dict:
    """{name: each task's top-k projected-residual triplets} for parameters of one shape:
    from the cached factors when they hold every direction (all such names in one batched
    `projected_top` call: on a GPU the call count, not the arithmetic, sets the time), else
    from the deltas (same subspace; the merge is the same up to rounding, tests)."""
    cache = ctx.cache
    out, batch = {}, []
    for name in names:
        if cache is not None and name in cache.names and not cache.keeps_all(name):
            taus, u_sum = ctx.inputs.deltas(name), sum_factors(ctx, name)[0]
            out[name] = projected_top_of_deltas(taus, u_sum, common, k, topk_solver(ctx.topk, ctx.device),
                                                _outside_parts(ctx, name, taus, u_sum))
        else:
            batch.append(name)
    if batch:
        factors = [task_factors(ctx, name) for name in batch]
        u_t, vh_t = [f[0] for f in factors], [f[2] for f in factors]   # unstacked: no copy per move
        s_t = torch.stack([f[1] for f in factors])
        u_sum = torch.stack([sum_factors(ctx, name)[0] for name in batch])
        proj = _projections(ctx, batch, u_t, s_t, u_sum)
        x, sig, y_h = projected_top(u_t, s_t, vh_t, u_sum, common, k, topk_solver(ctx.topk, ctx.device), proj)
        out.update({name: (x[i], sig[i], y_h[i]) for i, name in enumerate(batch)})
    return out


def _outside_parts(ctx, name: str, taus, u_sum):
    """`outside_parts` (W, G_out) of a tall parameter, kept in the memo when the set is resident
    (T·n·(n + r_sum) floats, at most 2n/m of its deltas, which are kept too); None (formed per call)
    for wide ones and streaming sets."""
    m = taus.shape[1]
    if u_sum.shape[-1] == m or not ctx.inputs.tvs.is_resident:
        return None
    key = ("iso_cts_outside", name, id(ctx.cache), str(ctx.device))
    if key not in ctx.memo:
        ctx.memo[key] = outside_parts(taus, u_sum)
    return ctx.memo[key]


def _projections(ctx, names: list[str], u_t: list[torch.Tensor], s_t, u_sum):
    """`task_projections` of a batch of names, kept in the memo per SpectralCache (a change of c then
    forms no m-sized product; module doc: Memory). Kept per batch and found per name: a batch computed
    before is read whole (no copy); a batch cut differently (a stoppable background merge runs in smaller
    groups, `analysis.merging.engine`) gathers its names' rows from the batches that hold them and forms
    only what none holds, so no projection is computed, or kept, twice."""
    tag = ("iso_cts_projections", id(ctx.cache), str(ctx.device))
    where = [ctx.memo.get((*tag, "name", name)) for name in names]   # (batch key, index) per name
    batch = where[0][0] if where[0] is not None else None
    if batch is not None and where == [(batch, i) for i in range(len(names))] \
            and ctx.memo[batch][0].shape[0] == len(names):
        return ctx.memo[batch]
    missing = [i for i, w in enumerate(where) if w is None]
    if missing:
        key = (*tag, "batch", tuple(names[i] for i in missing))
        ctx.memo[key] = _each_projections([(u_t[i], s_t[i], u_sum[i]) for i in missing])
        for j, i in enumerate(missing):
            where[i] = ctx.memo[(*tag, "name", names[i])] = (key, j)
        if len(missing) == len(names):
            return ctx.memo[key]
    parts = [ctx.memo[b] for b, _ in where]
    w = torch.stack([p[0][j] for p, (_, j) in zip(parts, where)])
    g = None if parts[0][1] is None else torch.stack([p[1][j] for p, (_, j) in zip(parts, where)])
    return w, g


def _each_projections(factors: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`task_projections` stacked over names, from each name's (U_t (T, m, r), S_t, U_sum), formed one
    name at a time into one output each. On the quick demo's first Iso-CTS merge the batched form's
    m-sized float32 and float64 temporaries, with the stack of U_t it needed, came to 1.3 GB of fresh
    memory (page faults); one name's are at most 38 MB."""
    w = g = None
    for i, (u_t, s_t, u_sum) in enumerate(factors):
        w_i, g_i = task_projections(u_t, s_t, u_sum)
        if w is None:
            w = w_i.new_empty(len(factors), *w_i.shape)
            g = None if g_i is None else g_i.new_empty(len(factors), *g_i.shape)
        w[i] = w_i
        if g is not None:
            g[i] = g_i
    return w, g


def topk_solver(choice: str, device) -> str:
    """"auto": subspace iteration on CUDA, where eigh is latency-bound (docs/results_gpu.md);
    "exact" elsewhere: on a CPU `top_eigh_exact` takes only the top k by LAPACK's MRRR where
    that pays (`analysis.svd._mrrr_pays`), 2.3× faster than the iteration on ViT-12's tall Grams one at a
    time, more over two worker threads (module doc: Speed)."""
    if choice == "auto":
        return "subspace" if torch.device(device).type == "cuda" else "exact"
    return choice


def _iso_cts(group, params, ctx):
    c, a = params["common_fraction"], params["alpha"]
    # keyed by the rank splits, not c: neighbouring c with the same split share one merge
    slot = unscaled_slot(ctx, "iso_cts", (split_ranks(params, ctx.inputs.tvs), params["include_embeddings"],
                                          ctx.polar, ctx.topk))
    if not all(name in slot for name in group.names):
        n_tasks = group.n_tasks
        shape = group.shape(group.names[0])
        m, n = shape[0], int(math.prod(shape[1:]))
        r = min(m, n)
        common, per_task = split_rank(r, n_tasks, c, params["split"])
        projected = _projected(ctx, group.names, common, per_task) if per_task > 0 else {}
        sums = {name: sum_factors(ctx, name) for name in group.names}
        # by common width kc (the sum's numerical rank may cut it below `common`)
        widths = {name: min(common, numerical_rank(sums[name][1], m, n)) for name in group.names}
        for kc in dict.fromkeys(widths.values()):
            names = [name for name in group.names if widths[name] == kc]
            u, vh, means = _directions([sums[name] for name in names], [projected.get(name) for name in names], kc)
            if per_task > 0:   # with c = 1 the sum's own U, V are already orthonormal
                # U* = [U_c, X]: X ⟂ U_c by construction, so polar(U*) = [U_c, polar(X)]
                u[:, :, kc:] = polar(u[:, :, kc:], ctx.polar)
                # V* = [V_c, Y] gets the full polar factor: its Gram is I + a low-rank part, but
                # for square matrices V* is nearly singular (λ_min(V*ᵀV*) 1e-11 to 1e-5 on the
                # demo), so a shortcut that takes V_c as exactly orthonormal was off by up to 4e-2
                vh = _v_polar(ctx, names, vh, kc)
            merged = (u @ vh).mul_(means[:, None, None])
            for i, name in enumerate(names):
                slot[name] = merged[i].reshape(group.shape(name))
    return {name: scaled(a, slot[name]) for name in group.names}


def _v_polar(ctx, names: list[str], vh: torch.Tensor, kc: int) -> torch.Tensor:
    """polar(V*)ᵀ for V*ᵀ = vh (N, kc + T·k, n) = [V_cᵀ; Yᵀ], on the Gram route: its Gram vh·vhᵀ from blocks,
    with the common block V_cᵀV_c a slice of the sum's own Gram (`_sum_gram`, kept per name), so a move forms
    only V_cᵀY and YᵀY: n·T·k·(kc + T·k) multiply-adds instead of n·(kc + T·k)². All in float64 from the same
    float32 rows, so the same Gram to rounding: V* is nearly singular on square matrices and its polar factor
    follows its Gram's smallest eigenvalues, so V_cᵀV_c is formed, not taken as I (module doc of `_iso_cts`).
    Other polar routes, and streaming sets (whose memory stays one model copy), take vh whole."""
    if polar_route(ctx.polar, vh.device) != "gram" or kc == 0 or not ctx.inputs.tvs.is_resident:
        return polar(vh, ctx.polar)
    vd = vh.double()
    head, tail = vd[:, :kc], vd[:, kc:]
    gram = torch.empty(vh.shape[0], vh.shape[1], vh.shape[1], dtype=torch.float64, device=vh.device)
    for i, name in enumerate(names):
        gram[i, :kc, :kc] = _sum_gram(ctx, name)[:kc, :kc]
    cross = head @ tail.mT
    gram[:, :kc, kc:] = cross
    gram[:, kc:, :kc] = cross.mT
    gram[:, kc:, kc:] = tail @ tail.mT
    return polar_gram(vh.mT, gram=gram).mT   # V* (n × r): the tall orientation, whose Gram this is


def _sum_gram(ctx, name: str) -> torch.Tensor:
    """V_sumᵀV_sum = vh·vhᵀ of the sum's right factors (r × r, float64), kept in the memo per SpectralCache:
    every common block V_cᵀV_c is its leading kc × kc slice."""
    key = ("iso_cts_sum_gram", name, id(ctx.cache), str(ctx.device))
    if key not in ctx.memo:
        vd = sum_factors(ctx, name)[2].double()
        ctx.memo[key] = vd @ vd.mT
    return ctx.memo[key]


def _directions(sums: list[tuple], projected: list[tuple | None], kc: int):
    """U* = [U_c, X_1 … X_T] (N, m, kc + T·k), V*ᵀ = [V_c, Y_1 … Y_T]ᵀ (N, kc + T·k, n) and the mean of
    [S_c, σ_1 … σ_T] (N,) of parameters of one shape and common width kc, from each one's sum factors
    (U, S, Vh) and projected triplets (X, σ, Yh), or None with no task directions (c = 1), each written into
    one buffer (per-name concatenations and then a stack copied them twice per move)."""
    (u_sum, s_sum, vh_sum), first = sums[0], projected[0]
    m, n = u_sum.shape[0], vh_sum.shape[1]
    t_k = 0 if first is None else first[0].shape[0] * first[0].shape[2]   # T·k task directions, X: (T, m, k)
    u = u_sum.new_empty(len(sums), m, kc + t_k)
    vh = vh_sum.new_empty(len(sums), kc + t_k, n)
    means = s_sum.new_empty(len(sums))
    for i, ((u_sum, s_sum, vh_sum), triplets) in enumerate(zip(sums, projected, strict=True)):
        u[i, :, :kc], vh[i, :kc] = u_sum[:, :kc], vh_sum[:kc]
        total = s_sum[:kc].sum()
        if triplets is not None:
            x, sig, y_h = triplets
            u[i, :, kc:] = x.movedim(0, 1).reshape(m, t_k)   # the tasks' k columns side by side
            vh[i, kc:] = y_h.reshape(t_k, n)
            total = total + sig.sum()
        means[i] = total / (kc + t_k)
    return u, vh, means


ISO_C = MergeMethod(
    "iso_c", "the summed task vector's singular directions with a flat (isotropic) spectrum", _iso_c,
    (alpha(1.0), include_embeddings()),
    covers=decomposed, peak_memory="one parameter's T deltas, plus the sum's full SVD of every matrix (kept in "
    "the inputs' memo, so an α change decomposes nothing)",
    reference="Marczak et al., No task left behind: isotropic model merging, ICML 2025")

ISO_CTS = MergeMethod(
    "iso_cts", "common subspace of the sum + each task's own directions, orthogonalised, flat spectrum", _iso_cts,
    (Hyperparameter("common_fraction", "float", 0.8, 0.0, 1.0, 0.01,
                    "c: fraction of each layer's rank given to the common subspace of the summed task vector"),
     alpha(1.0), include_embeddings(),
     Hyperparameter("split", "choice", "published", choices=SPLIT_RULES,
                    help="rank split: 'published' (the authors' code: T·round((r − ⌊c·r⌋)/T) task "
                         "directions) or 'exact_fill' (⌊(r − ⌊c·r⌋)/T⌋ per task, common never below ⌊c·r⌋)")),
    needs=Needs(spectra=True), covers=decomposed, group_by="shape", same_merge=_same_iso_cts,
    peak_memory="one shape-group run's deltas and factors, plus the sum's full SVD, the unscaled merged delta "
                "and the task projections of every matrix (module doc: Memory)",
    reference="Marczak et al., No task left behind: isotropic model merging, ICML 2025")
