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
  whose Gram matrix is (near) singular go to the SVD.
- `polar_newton_schulz`: matmul-only iterations, the fast path for GPUs
  (tensor cores). A few quintic steps push the small singular values up fast
  (bf16 on CUDA), then cubic Newton–Schulz steps `Y ← 1.5·Y − 0.5·Y(YᵀY)` in
  float32 converge quadratically to W. Convergence is checked on every matrix
  from the Gram matrix the step computes anyway (‖YᵀY − I‖_F / √p); matrices
  that have not converged (e.g. exactly rank-deficient ones, where the polar
  factor is not unique) are solved exactly instead.
"""
from __future__ import annotations

import torch

from analysis.svd import thin_svd

# Quintic map x ↦ a·x + b·x³ + c·x⁵ (the coefficients popularised by the Muon
# optimiser): slope 3.44 at 0, maps [0, 1] into (0, 1.21]; it does not
# converge to 1 by itself, so the cubic steps finish the job.
_QUINTIC = (3.4445, -4.7750, 2.0315)


def polar(x: torch.Tensor, method: str = "auto", **kwargs) -> torch.Tensor:
    """Polar factor of x (..., m, p). method: "exact" | "gram" | "newton_schulz" | "auto"
    ("auto": Newton–Schulz on CUDA, where matmuls are cheap; the Gram route elsewhere)."""
    if method == "auto":
        method = "newton_schulz" if x.device.type == "cuda" else "gram"
    if method == "exact":
        return polar_exact(x)
    if method == "gram":
        return polar_gram(x, **kwargs)
    if method == "newton_schulz":
        return polar_newton_schulz(x, **kwargs)
    raise ValueError(f"unknown polar solver {method!r}; expected 'auto', 'exact', 'gram' or 'newton_schulz'")


def polar_exact(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = thin_svd(x)   # falls back to float64 / Gram when LAPACK does not converge
    return p @ qh


def polar_gram(x: torch.Tensor, rcond: float = 1e-10, return_info: bool = False):
    """W = Y (YᵀY)^(-1/2) on the tall orientation, eigh in float64; SVD where
    λ_min(YᵀY) ≤ rcond·λ_max (rank-deficient: the polar factor is not unique)."""
    wide = x.shape[-2] < x.shape[-1]
    y = (x.mT if wide else x).float()
    squeeze = y.ndim == 2
    if squeeze:
        y = y.unsqueeze(0)
    yd = y.double()
    evals, evecs = torch.linalg.eigh(yd.mT @ yd)
    bad = evals[:, 0] <= rcond * evals[:, -1].clamp_min(torch.finfo(torch.float64).tiny)
    inv_sqrt = (evecs * evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt().unsqueeze(-2)) @ evecs.mT
    w = (yd @ inv_sqrt).float()
    if bool(bad.any()):
        w[bad] = polar_exact(y[bad])
    w = w[0] if squeeze else w
    w = w.mT if wide else w
    if return_info:
        return w, {"fallback": int(bad.sum())}
    return w


def polar_newton_schulz(x: torch.Tensor, quintic_steps: int = 5, max_cubic_steps: int = 40,
                        tol: float = 1e-3, fast_dtype: torch.dtype | None = None,
                        return_info: bool = False):
    """Polar factor by scaled Newton–Schulz iterations, exact fallback per matrix.

    `tol` bounds ‖YᵀY − I‖_F / √p before one last cubic step (which squares
    the error), so the returned factor is typically within ~1e-6 of the exact
    one in relative Frobenius norm.
    """
    wide = x.shape[-2] < x.shape[-1]
    y = (x.mT if wide else x).float()
    squeeze = y.ndim == 2
    if squeeze:
        y = y.unsqueeze(0)
    p = y.shape[-1]
    eye = torch.eye(p, device=y.device, dtype=torch.float32)
    # σ_max² ≤ ‖YᵀY‖_∞ (max absolute row sum): a cheap, safe scale to σ ≤ 1
    gram = y.mT @ y
    bound = gram.abs().sum(-1).amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    y = y / bound.sqrt()[:, None, None]
    if fast_dtype is None:
        fast_dtype = torch.bfloat16 if y.device.type == "cuda" else torch.float32
    a, b, c = _QUINTIC
    yf = y.to(fast_dtype)
    for _ in range(quintic_steps):
        g = yf.mT @ yf
        yf = a * yf + yf @ (b * g + c * (g @ g))
    y = yf.float()
    done = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    steps = 0
    for steps in range(1, max_cubic_steps + 1):
        g = y.mT @ y
        err = torch.linalg.matrix_norm(g - eye) / p ** 0.5
        converged_now = err <= tol
        y_next = 1.5 * y - 0.5 * (y @ g)
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
        return out, {"cubic_steps": steps, "fallback": int(fallback.sum())}
    return out
