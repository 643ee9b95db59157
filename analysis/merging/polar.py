"""The orthogonal polar factor: the nearest matrix with orthonormal columns (or rows).

For X (m × p) with thin SVD X = P D Qᵀ, the polar factor W = P Qᵀ minimises
‖X − W‖_F over all W with WᵀW = I (when m ≥ p) or WWᵀ = I (when m < p: a
wide matrix cannot have orthonormal columns, so the nearest matrix with
orthonormal *rows* is returned: a partial isometry of rank m).

Three solvers:
- `polar_exact`: the definition, via SVD.
- `polar_gram`: W = X (XᵀX)^(-1/2) with the Gram matrix's eigendecomposition
  in float64 (squaring the condition number costs nothing at float32
  output); a direct solver, about twice as fast as the SVD on CPU. Matrices
  whose Gram matrix is (near) singular go to the SVD. (·)^(-1/2) is applied
  in float32 where κ(XᵀX) ≤ 1e6 (`times_inverse_sqrt`): TSV-M and Iso-CTS
  merges within 6.7e-6 of the float64 product, worst matrix, on the quick
  demo and two ViT blocks.
- `polar_newton_schulz`: matmul-only iterations, the fast path for GPUs.
  Scaled so every singular value is ≤ 1 (σ_max² ≤ min(‖G‖_F, ‖G‖_∞) for
  the Gram matrix G = YᵀY: a rigorous bound, tight for nearly orthonormal
  inputs), then a few quintic steps push the small singular values up fast
  (slope 3.44 at 0), then cubic Newton–Schulz steps Y ← 1.5·Y − 0.5·Y(YᵀY)
  converge quadratically. Convergence is checked on every matrix from the
  Gram matrix each step computes anyway (‖YᵀY − I‖_F / √p); a matrix stops
  one step after it reaches `tol`, and the ones that have not converged
  within the bounded number of steps (exactly rank-deficient ones, whose
  polar factor is not unique, or κ beyond ~1e5) are solved exactly instead.

  Precision. Every step's rounding error moves the limit: the iteration
  converges to the polar factor of the *rounded* iterate, and an error ε in
  an early iterate (small σ_min) moves it by up to ~ε/σ_min. So low-precision
  phases cannot be repaired later; all matmuls must be float32-accurate.
  Measured on CPU against `polar_exact` (relative Frobenius error), on six
  inputs with κ from 3 to 6.1e3, incl. TSV-M's concatenated task bases of a
  768 × 768 layer at T = 8 (11 to 13 steps each, no fallback); the TF32 rows
  emulate tensor cores by truncating every matmul operand to TF32's 10-bit
  mantissa (tests/test_merging_polar.py); GPU errors and times come from
  `benchmarks/polar.py --device cuda`:
    precision="float32" (IEEE matmuls, TF32 forced off):    1.1e-6 to 4.0e-6
    precision="tf32x3" (each product as three TF32 tensor-core products
      a_hi·b_hi + a_hi·b_lo + a_lo·b_hi, the "3xTF32" split): 1.2e-6 to 4.0e-6
    one plain TF32 product per matmul:                       1.3e-3 to 1.7e-3 (not offered)
    a bfloat16 quintic phase (the earlier CUDA default):      1.4e-2 to 2.9e-2 (removed)
  "auto" is "float32" everywhere: measured on an H100 (benchmarks/polar.py
  --device cuda, 4 ViT blocks, T = 8, docs/results_gpu.md) plain float32 took
  0.0298 s against 0.0471 s for "tf32x3" (three products cost more than the
  tensor cores save at these sizes), with the same 1.3e-4 error vs exact.
"""
from __future__ import annotations

import torch

from analysis.svd import batched_eigh, thin_svd, tf32_matmuls

# Quintic map x ↦ a·x + b·x³ + c·x⁵ (the coefficients popularised by the Muon
# optimiser): slope 3.44 at 0, maps [0, 1] into (0, 1.21]; it does not
# converge to 1 by itself, so the cubic steps finish the job.
_QUINTIC = (3.4445, -4.7750, 2.0315)


def polar(x: torch.Tensor, method: str = "auto", **kwargs) -> torch.Tensor:
    """Polar factor of x (..., m, p). method: "exact" | "gram" | "newton_schulz" | "auto"
    ("auto": Newton–Schulz on CUDA, where matmuls are cheap; the Gram route elsewhere)."""
    method = polar_route(method, x.device)
    if method == "exact":
        return polar_exact(x)
    if method == "gram":
        return polar_gram(x, **kwargs)
    if method == "newton_schulz":
        return polar_newton_schulz(x, **kwargs)
    raise ValueError(f"unknown polar solver {method!r}; expected 'auto', 'exact', 'gram' or 'newton_schulz'")


def polar_route(method: str, device) -> str:
    """The solver `polar(x, method)` uses on `device`: "auto" is Newton–Schulz on CUDA, else "gram"."""
    if method == "auto":
        return "newton_schulz" if torch.device(device).type == "cuda" else "gram"
    return method


def polar_exact(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = thin_svd(x)   # falls back to float64 / Gram when LAPACK does not converge
    return p @ qh


def polar_gram(x: torch.Tensor, rcond: float = 1e-10, return_info: bool = False, gram: torch.Tensor | None = None):
    """W = Y (YᵀY)^(-1/2) on the tall orientation, eigh in float64; SVD where
    λ_min(YᵀY) ≤ rcond·λ_max (rank-deficient: the polar factor is not unique).
    gram: YᵀY in float64 where the caller has it from parts it keeps (Iso-CTS's V*), else formed here."""
    wide = x.shape[-2] < x.shape[-1]
    y = (x.mT if wide else x).float()
    squeeze = y.ndim == 2
    if squeeze:
        y = y.unsqueeze(0)
    yd = None
    if gram is None:
        yd = y.double()
        gram = yd.mT @ yd
    evals, evecs = batched_eigh(gram.reshape(y.shape[0], y.shape[-1], y.shape[-1]))
    bad = evals[:, 0] <= rcond * evals[:, -1].clamp_min(torch.finfo(torch.float64).tiny)
    w = times_inverse_sqrt(y, evals, evecs, yd)
    if bool(bad.any()):
        w[bad] = polar_exact(y[bad])
    w = w[0] if squeeze else w
    w = w.mT if wide else w
    if return_info:
        return w, {"fallback": int(bad.sum())}
    return w


# Directions q_i of the Gram with λ_max/λ_i up to this are applied in float32 by `times_inverse_sqrt`, the
# rest in float64. A whole float32 product's error grows like √κ (against the float64 product, TSV-M on the
# quick demo: 4.9e-7 at κ = 89, 2.0e-6 at 8.5e3, 6.4e-6 at 1.7e5), and it is 2–2.7× faster on the 2-core
# CPU. Up to 2026-12-07 the rule was per matrix (float32 where κ ≤ 1e6, else all float64); per direction
# with the same cap no direction is applied less accurately than a whole matrix was allowed to be. On an
# Iso-CTS move of the quick demo (c 0.8 → 0.7 / 0.5, each batch against its float64 product) a cap of
# 1e6 / 1e4 / 1e3 gave at most 6.1e-6 / 1.6e-6 / 7.4e-7 with 3 / 23 / 63 float64 directions of 384, in the
# same time; all-float64, as the V* Grams (κ 1e6–1e10) were before, took 17–88 ms per batch against
# 11–55 ms. A cap of 1e4 made TSV-M moves 6 % slower (κ 1e4–1e6 Grams got float64 directions), so 1e6.
FLOAT32_APPLY_MAX_KAPPA = 1e6


def times_inverse_sqrt(y: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor,
                       y64: torch.Tensor | None = None) -> torch.Tensor:
    """Y·G^(-1/2) as float32 for y (B, m, p) and G = Q Λ Qᵀ (evals (B, p) ascending, evecs (B, p, p),
    float64), direction by direction: Y q_i is taken in float64 where λ_i < λ_max / FLOAT32_APPLY_MAX_KAPPA
    (each matrix's first J_i columns of Q), in float32 elsewhere. A float32
    product costs eps32·√(λ_max/λ_i) in direction i, relative to that direction's own size, and every
    column of Y Q Λ^(-1/2) has norm 1, so each direction's error stays within what the whole-matrix rule
    allowed (float32 where κ(G) ≤ FLOAT32_APPLY_MAX_KAPPA); the final products with Qᵀ are in float32
    (unit columns times orthonormal rows). Iso-CTS's V* Grams on the quick demo have κ 1e6–1e10 from only
    1–3 such directions, so the whole 384³ products no longer run in float64.
    For m < 2p it is ((Y Q) Λ^(-1/2)) Qᵀ, two m·p² products, else Y (Q_g Λ_g^(-1/2) Q_gᵀ) for the float32
    directions g with the p × p factor formed in float64, plus the float64 directions' (Y Q_b Λ_b^(-1/2)) Q_bᵀ:
    on the 2-core CPU, 24 of 384 × 368 took 32 against 54 ms the second way, 6 of 1536 × 368 28 against
    22 ms. y64: y in float64 where the caller has it (else converted here, only if some direction needs it)."""
    tiny = torch.finfo(torch.float64).tiny
    scale = evals.clamp_min(tiny).rsqrt().unsqueeze(-2)                 # Λ^(-1/2) as a row
    # each matrix's own float64 directions (ascending λ: its first J_i), so which directions take float64 never
    # depends on the other matrices in the batch (a background merge batches differently from a page's; the
    # float32 products of a batch of one and of two may still round differently)
    in64 = evals < evals[:, -1:] / FLOAT32_APPLY_MAX_KAPPA                # (B, p)
    worst = int(in64.sum(-1).max()) if evals.numel() else 0
    q32 = evecs.float()
    if worst and y64 is None:
        y64 = y.double()
    exact = ((y64 @ evecs[..., :worst]) * scale[..., :worst]).float() if worst else None   # unit columns
    if y.shape[-2] < 2 * y.shape[-1]:
        z = (y @ q32) * scale.float()
        if worst:
            z[..., :worst] = torch.where(in64[:, None, :worst], exact, z[..., :worst])
        return z @ q32.mT
    good = ((evecs * scale.masked_fill(in64.unsqueeze(-2), 0)) @ evecs.mT).float()
    out = y @ good
    if worst:
        out = out + (exact * in64[:, None, :worst]) @ q32[..., :worst].mT
    return out


PRECISIONS = ("auto", "float32", "tf32x3")


def _round_tf32(a: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest TF32 value (10-bit mantissa, ties away from zero)."""
    bits = a.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tensor_core_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with TF32 allowed (CUDA tensor cores); tests swap in an emulation."""
    with tf32_matmuls(True):
        return a @ b


def _float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in IEEE float32, whatever the global TF32 setting."""
    with tf32_matmuls(False):
        return a @ b


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b to float32 accuracy from three TF32 products (a = a_hi + a_lo, the
    a_lo·b_lo term is below float32 resolution): tensor-core speed, no TF32 error."""
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return _tensor_core_matmul(a_hi, b_hi) + (_tensor_core_matmul(a_hi, b_lo) + _tensor_core_matmul(a_lo, b_hi))


def polar_newton_schulz(x: torch.Tensor, quintic_steps: int = 7, max_cubic_steps: int = 30,
                        tol: float = 1e-3, precision: str = "auto", return_info: bool = False):
    """Polar factor by scaled Newton–Schulz iterations, exact fallback per matrix.

    At most `quintic_steps + max_cubic_steps` steps (each: 2 to 3 batched
    matmuls). `tol` bounds ‖YᵀY − I‖_F / √p before one last cubic step (which
    squares the error), so the returned factor is within ~1e-6 of the exact
    one in relative Frobenius norm (≤ 4e-6 measured, module doc), well inside
    the 1e-4 the merges promise. `precision`: "auto" | "float32" | "tf32x3"
    (module doc).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        precision = "float32"   # faster than tf32x3 on an H100 at these sizes (module doc)
    mm = tf32x3_matmul if precision == "tf32x3" else _float32_matmul
    wide = x.shape[-2] < x.shape[-1]
    y = (x.mT if wide else x).float()
    squeeze = y.ndim == 2
    if squeeze:
        y = y.unsqueeze(0)
    p = y.shape[-1]
    eye = torch.eye(p, device=y.device, dtype=torch.float32)
    # σ_max² = ‖G‖_2 ≤ min(‖G‖_F, ‖G‖_∞): a rigorous bound, so every σ ≤ 1 after scaling
    gram = mm(y.mT, y)
    bound = torch.minimum(torch.linalg.matrix_norm(gram), gram.abs().sum(-1).amax(-1))
    y = y / bound.clamp_min(torch.finfo(torch.float32).tiny).sqrt()[:, None, None]
    a, b, c = _QUINTIC
    for _ in range(quintic_steps):
        g = mm(y.mT, y)
        y = a * y + mm(y, b * g + c * mm(g, g))
    done = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    steps = 0
    for steps in range(1, max_cubic_steps + 1):
        g = mm(y.mT, y)
        err = torch.linalg.matrix_norm(g - eye) / p ** 0.5
        converged_now = err <= tol
        y_next = 1.5 * y - 0.5 * mm(y, g)
        # one more step after the tolerance is met, then freeze that matrix
        y = torch.where(done[:, None, None], y, y_next)
        done = done | converged_now
        if bool(done.all()):
            break
    fallback = ~done
    if bool(fallback.any()):
        src = (x.mT if wide else x).float()
        src = src.unsqueeze(0) if squeeze else src
        y[fallback] = polar_exact(src[fallback])
    out = y[0] if squeeze else y
    out = out.mT if wide else out
    if return_info:
        return out, {"cubic_steps": steps, "fallback": int(fallback.sum()), "precision": precision,
                     "steps": quintic_steps + steps}
    return out
