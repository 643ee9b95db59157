"""DELLA (Deep et al., 2024): magnitude-ranked random drop, rescale, elect, fuse.

"DELLA-Merging: Reducing interference in model merging through
magnitude-based sampling" (arXiv 2406.11617), with mergekit's `della`
conventions (density, epsilon, lambda = α here):

1. Drop (MagPrune): in each row of each task's delta (a matrix's rows, a conv
   kernel's output filters, a vector as one row) the entries are ranked by
   magnitude, r = 0 (smallest) … n−1 (largest), and entry r is kept with
   probability p_r = (density − ε) + 2ε·r/(n−1): from density − ε for the
   smallest to density + ε for the largest (a single-entry row: density).
2. Rescale: a kept entry is divided by its keep probability p_r (= 1/(1 − its
   drop probability)), so every entry keeps its expectation.
3. Elect and fuse as TIES: each entry's sign is the sign of the sum of the
   rescaled deltas; the deltas that agree with it are averaged.
4. The merged delta is α × that.
density = 1 drops nothing (steps 3–4 alone). density ± ε must lie in (0, 1)
otherwise (mergekit raises the same error).

The drop is random: the mask of (task, parameter) comes from a generator fixed
by (seed, task index, parameter name), as DARE's, so a merge is reproducible.

Differences from mergekit: mergekit (since v0.1) rescales each kept tensor to
its original L1 norm; here each kept entry is divided by its own keep
probability, as the paper and the method's first mergekit version did.
mergekit elects + where the signed sum is exactly 0; here such an entry
merges to 0 (as our TIES). Ties in magnitude are ranked by position (a stable
sort). A single-entry row has no rank range; mergekit divides 0 by 0 there.
Every parameter is merged this way, as in mergekit. Defaults: ε = 0.15
(mergekit's), density = 0.5 (mergekit's default, 1, drops nothing; the paper
tunes the drop rate per task family), α = 1 (mergekit's λ).
"""
from __future__ import annotations

import torch

from analysis.errors import HyperparameterError
from analysis.merging.base import Hyperparameter, MergeMethod, alpha
from analysis.merging.breadcrumbs import magnitude_ranks
from analysis.merging.dare import mask_generator
from analysis.merging.ties import disjoint_merge


def as_rows(tau: torch.Tensor) -> torch.Tensor:
    """(T, *shape) -> (T, rows, n): matrix rows, conv filters; a vector is one row."""
    if tau.ndim == 2:
        return tau.reshape(tau.shape[0], 1, -1)
    return tau.reshape(tau.shape[0], tau.shape[1], -1)


def keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """(T, R, n) deltas -> (T, R, n) keep probability of each entry, by its magnitude rank in its row."""
    t, r, n = rows.shape
    if n == 1:
        return torch.full_like(rows, density)
    ranks = magnitude_ranks(rows.reshape(t * r, n)).reshape(t, r, n).to(rows.dtype)
    return (density - epsilon) + (2.0 * epsilon / (n - 1)) * ranks


def magprune(tau: torch.Tensor, density: float, epsilon: float, seed: int, name: str) -> torch.Tensor:
    """(T, *shape) -> the same, each entry kept with its MagPrune probability and divided by it."""
    if density >= 1.0:
        return tau
    rows = as_rows(tau)
    prob = keep_probabilities(rows, density, epsilon)
    out = torch.empty_like(rows)
    for t in range(rows.shape[0]):
        draw = torch.rand(rows.shape[1:], generator=mask_generator(seed, t, name)).to(rows.device)
        out[t] = torch.where(draw < prob[t], rows[t] / prob[t], torch.zeros_like(rows[t]))
    return out.reshape(tau.shape)


def check_density_epsilon(params) -> None:
    d, e = params["density"], params["epsilon"]
    if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
        raise HyperparameterError(f"della: keep probabilities density ± epsilon must lie in (0, 1); "
                                  f"density={d!r}, epsilon={e!r} give [{d - e:.4g}, {d + e:.4g}] "
                                  "(lower epsilon, or move density away from 0 and 1)")


def _della(group, params, ctx):
    out = {}
    for name in group.names:
        dropped = magprune(group.deltas(name), params["density"], params["epsilon"], params["seed"], name)
        no_trim = torch.zeros(group.n_tasks, device=dropped.device, dtype=dropped.dtype)
        out[name] = params["alpha"] * disjoint_merge(dropped, no_trim)
    return out


DELLA = MergeMethod(
    "della", "drop entries at random, large ones less often (MagPrune), rescale, then elect signs and average",
    _della,
    (Hyperparameter("density", "float", 0.5, 0.2, 1.0, 0.01,
                    "mean keep probability; 1 keeps every entry"),
     Hyperparameter("epsilon", "float", 0.15, 0.0, 0.45, 0.01,
                    "ε: keep probabilities run from density − ε (smallest entry of a row) to density + ε (largest)"),
     alpha(1.0),
     Hyperparameter("seed", "int", 0, 0, 2 ** 31 - 1, 1, "random seed of the drop masks")),
    check=check_density_epsilon,
    reference="Deep et al., DELLA-Merging: Reducing interference in model merging through magnitude-based "
              "sampling, 2024 (arXiv 2406.11617)")
