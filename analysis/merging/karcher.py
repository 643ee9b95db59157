"""Karcher mean (multi-SLERP): the Riemannian mean of the task vectors' directions.

Per parameter tensor (flattened), with mergekit's `karcher` conventions:
the task vectors' directions û_t = τ_t/‖τ_t‖ are points on the unit sphere;
their Karcher (Fréchet) mean u, the point minimising Σ_t d(u, û_t)² in
geodesic distance, is found by the fixed-point iteration
    g = (1/T') Σ_t θ_t/sin θ_t · (û_t − cos θ_t · u)    (θ_t = ∠(u, û_t); the mean log map)
    u ← cos‖g‖ · u + sin‖g‖ · g/‖g‖                     (the exponential map)
from the normalised arithmetic mean of the û_t, until ‖g‖ < tol or
`max_iter` steps (terms with θ_t < tol are skipped). The merged delta is
α · (mean_t ‖τ_t‖) · u: the mean norm of all T task vectors (zero ones
included) on the mean direction. With two task vectors of equal norm this
is SLERP at t = 0.5; with identical directions, that direction.

Every iterate is a combination of the û_t, so the iteration runs on their
T × T Gram matrix in float64 (u = Σ c_t û_t, c updated) and the tensor is
formed once at the end: the cost is one Gram matrix per tensor, whatever
`max_iter` is.

Differences from mergekit: mergekit merges the models' weights (no base
model); here, as for `slerp`, the task vectors. mergekit leaves out vectors
with norm ≤ tol from the direction mean, which would drop whole task vectors
of small parameters; here only exactly-zero ones are left out (their norm
still counts, as 0, in the mean norm). An exactly opposite direction
(θ_t = π) has no log map and is skipped, where mergekit divides by sin π.
"""
from __future__ import annotations

import math

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Unit vectors' (K, K) Gram matrix -> c with u = Σ c_i û_i their Karcher mean (K ≥ 1)."""
    k = gram.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)

    def norm(c) -> float:
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    c = w.clone()
    start = norm(c)
    if start == 0.0 or start < tol:       # the directions cancel: start from the first one (mergekit)
        c = torch.zeros_like(w)
        c[0] = 1.0
    else:
        c = c / start
    for _ in range(max_iter):
        dots = (gram @ c).clamp(-1.0, 1.0)                 # cos θ_i = <û_i, u>
        theta = torch.arccos(dots)
        sin = torch.sin(theta)
        use = (theta >= tol) & (sin > 1e-12)               # θ ≈ 0 adds nothing; θ = π has no log map
        coef = torch.where(use, w * theta / torch.where(use, sin, torch.ones_like(sin)), torch.zeros_like(sin))
        g = coef - (coef * dots).sum() * c                 # Σ coef_i (û_i − cos θ_i · u), as coefficients
        g_norm = norm(g)
        if g_norm < tol or g_norm == 0.0:
            break
        c = math.cos(g_norm) * c + (math.sin(g_norm) / g_norm) * g
        c = c / norm(c)
    return c


def karcher_merge(tau: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """(T, *shape) task vectors -> (mean norm) × their Karcher-mean direction, float32."""
    flat = tau.reshape(tau.shape[0], -1).double()
    norms = flat.norm(dim=1)
    nonzero = norms > 0
    if not bool(nonzero.any()):
        return torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device)
    units = flat[nonzero] / norms[nonzero, None]
    c = karcher_coefficients(units @ units.T, max_iter, tol)
    return (norms.mean() * (c @ units)).to(tau.dtype).reshape(tau.shape[1:])


def _karcher(group, params, ctx):
    return {name: params["alpha"] * karcher_merge(group.deltas(name), params["max_iter"], params["tol"])
            for name in group.names}


KARCHER = MergeMethod(
    "karcher", "Riemannian (Karcher) mean of the task vectors' directions, at their mean norm (multi-SLERP)",
    _karcher,
    (Hyperparameter("max_iter", "int", 10, 1, 200, 1, "most fixed-point steps of the mean on the sphere"),
     Hyperparameter("tol", "float", 1e-5, 0.0, 1e-3, 1e-6,
                    "stop when the mean log map's norm (radians) is below tol"),
     alpha(1.0)),
    reference="Karcher, Riemannian center of mass and mollifier smoothing, Comm. Pure Appl. Math. 1977; "
              "as mergekit's `karcher` merge method")
