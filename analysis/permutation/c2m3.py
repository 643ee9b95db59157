"""C2M3: cycle-consistent multi-model merging (Crisostomi et al., NeurIPS 2024,
arXiv 2405.17897), written from the paper's definitions.

Every model i gets, for every permutation group g, a matrix P_i (n x n) mapping
its units into a shared universe: M_i = W_i with each permuted axis multiplied
by its group's P_i ("model i in the universe"). The objective is the weight
matching objective summed over all pairs of models,

    f(P) = sum_{i<j} sum_params <M_i, M_j> = 1/2 sum_params (||sum_i M_i||^2 - sum_i ||M_i||^2),

which equals sum_{i<j} <W_i, (P_i^T P_j) . W_j>: the pairwise map from j to i is
P_i^T P_j. The second form costs O(N) per parameter instead of O(N^2).

Optimisation: relax every P_i to the Birkhoff polytope (doubly-stochastic
matrices) and run Frank-Wolfe on all of them jointly: gradient of f; for each
P_i the vertex (permutation) maximising <grad, .> is a linear assignment
(scipy, CPU); step along (vertex - P). Step size: exact line search. Along a
direction, every M_i is a polynomial in the step t of degree (number of
permuted axes of that parameter), so f is a polynomial of degree at most
2 x that number (4 for MLP and conv weights); we evaluate f at degree+1 step
sizes, interpolate the polynomial exactly and take its maximum on [0, 1].
At the end each P_i is projected to the nearest permutation (a linear
assignment maximising <P_i, Pi>).

Cycle consistency is by construction: the pairwise permutations are
p_ij = perm_j[inv(perm_i)] and any cycle composes to the identity exactly.

Index convention (as in specs.py): `perms[i][g]` has universe unit u = model
i's unit perms[i][g][u], so `apply_permutation(sd_i, spec, perms[i])` is
model i in the universe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from analysis.device import get_device
from analysis.errors import HyperparameterError, ValidationError
from analysis.permutation.specs import PermutationSpec, StateDict, apply_permutation, invert
from analysis.permutation.weight_matching import _prepare, linear_assignment, unit_rows, weight_matching

Tensor = torch.Tensor


@dataclass
class C2M3Result:
    perms: list[dict[str, Tensor]]          # model i -> universe (CPU LongTensors)
    objective: list[float] = field(default_factory=list)  # relaxed f after each Frank-Wolfe step
    final_objective: float = float("nan")   # f at the projected permutations
    iterations: int = 0
    converged: bool = False

    def pairwise(self, i: int, j: int) -> dict[str, Tensor]:
        """Permutations putting model j in model i's basis (p_ij = P_i^T P_j)."""
        return {g: self.perms[j][g][invert(self.perms[i][g])] for g in self.perms[i]}


def _times_axis(t: Tensor, p: Tensor, axis: int) -> Tensor:
    """p (n x n) applied to axis `axis` of t: out[.., u, ..] = sum_k p[u, k] t[.., k, ..]."""
    return torch.tensordot(p, t, dims=([1], [axis])).movedim(0, axis)


def _to_universe(w: Tensor, groups: tuple[str | None, ...], P: Mapping[str, Tensor], skip_axis: int | None = None) -> Tensor:
    for axis, g in enumerate(groups):
        if g is not None and axis != skip_axis:
            w = _times_axis(w, P[g], axis)
    return w


def _objective(models, spec, P) -> float:
    total = 0.0
    for name, groups in spec.axes.items():
        ms = [_to_universe(m[name], groups, P[i]) for i, m in enumerate(models)]
        s = torch.stack(ms).sum(0)
        total += 0.5 * (float(s.double().pow(2).sum()) - sum(float(m.double().pow(2).sum()) for m in ms))
    return total


def _gradients(models, spec, P) -> list[dict[str, Tensor]]:
    grads = [{g: torch.zeros_like(p) for g, p in Pi.items()} for Pi in P]
    for name, groups in spec.axes.items():
        ms = [_to_universe(m[name], groups, P[i]) for i, m in enumerate(models)]
        s = torch.stack(ms).sum(0)
        for i, m in enumerate(models):
            rest = s - ms[i]  # d f / d M_i = sum of the other models in the universe
            for axis, g in enumerate(groups):
                if g is None:
                    continue
                partial = _to_universe(m[name], groups, P[i], skip_axis=axis)
                grads[i][g] += unit_rows(rest, axis) @ unit_rows(partial, axis).T
    return grads


def _best_step(f_at, degree: int, f0: float) -> tuple[float, float]:
    """Exact maximiser on [0, 1] of the degree-`degree` polynomial f(t)."""
    ts = np.linspace(0.0, 1.0, degree + 1)
    fs = np.array([f0] + [f_at(t) for t in ts[1:]])
    coef = np.polyfit(ts, fs, degree)
    cands = [0.0, 1.0] + [float(r.real) for r in np.roots(np.polyder(coef))
                          if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0]
    vals = [f0 if t == 0.0 else float(np.polyval(coef, t)) for t in cands]
    k = int(np.argmax(vals))
    return cands[k], vals[k]


def c2m3(state_dicts: Sequence[StateDict], spec: PermutationSpec, *, max_iter: int = 100, tol: float = 1e-6,
         init: Literal["identity", "weight_matching"] = "identity", seed: int = 0,
         device: str | torch.device | None = None) -> C2M3Result:
    """Permutations of N >= 2 models to a shared universe (see module docstring).

    init: "identity" starts every P_i at the identity (all models in their own
    basis); "weight_matching" starts model 0 at the identity and model i at
    the pairwise weight matching of i to model 0 (still cycle-consistent).
    Model 0's P stays the identity, so the universe's unit order is model
    0's: f is invariant to relabelling the universe, and with every P free
    the first Frank-Wolfe steps pull the models towards conflicting
    relabellings (on a model and its permuted copy, A moves towards pi^-1
    while B moves towards pi). Fixing one P removes that symmetry only.
    Stops when the Frank-Wolfe gap <grad, vertex - P> is below tol x |f| or
    the line search finds no ascent."""
    if len(state_dicts) < 2:
        raise ValidationError(f"C2M3 needs at least 2 models, got {len(state_dicts)}")
    if max_iter < 0:
        raise HyperparameterError(f"max_iter must be >= 0, got {max_iter}")
    if init not in ("identity", "weight_matching"):
        raise HyperparameterError(f"init must be 'identity' or 'weight_matching', got {init!r}")
    device = get_device(device)
    models, sizes = _prepare(list(state_dicts), spec, device)
    eye = {g: torch.eye(n, device=device) for g, n in sizes.items()}
    P = [dict(eye) for _ in models]
    if init == "weight_matching":
        for i in range(1, len(models)):
            p = weight_matching(models[0], models[i], spec, seed=seed + i, device=device)
            P[i] = {g: eye[g][p[g].to(device)] for g in sizes}  # row u has its 1 at p[u]
    degree = 2 * max((sum(g is not None for g in groups) for groups in spec.axes.values()), default=1)

    f = _objective(models, spec, P)
    result = C2M3Result(perms=[], objective=[f])
    for it in range(max_iter):
        grads = _gradients(models, spec, P)
        D, gap = [], 0.0
        for i in range(1, len(models)):  # P_0 stays the identity (gauge, see c2m3's docstring)
            Di = {}
            for g, grad in grads[i].items():
                vertex = eye[g][linear_assignment(grad).to(device)]  # permutation matrix, row u -> col p[u]
                Di[g] = vertex - P[i][g]
                gap += float((grad.double() * Di[g].double()).sum())
            D.append(Di)
        D.insert(0, {g: torch.zeros_like(p) for g, p in P[0].items()})
        result.iterations = it + 1
        if gap <= tol * max(1.0, abs(f)):
            result.converged = True
            break

        def f_at(t: float) -> float:
            return _objective(models, spec, [{g: P[i][g] + t * D[i][g] for g in P[i]} for i in range(len(P))])

        t, f_new = _best_step(f_at, degree, f)
        if t <= 0.0 or f_new <= f + tol * max(1.0, abs(f)) * 1e-3:
            result.converged = True
            break
        P = [{g: P[i][g] + t * D[i][g] for g in P[i]} for i in range(len(P))]
        f = _objective(models, spec, P)  # recomputed, not the interpolated value
        result.objective.append(f)

    # projection: the permutation with the largest overlap <P_i, Pi>
    result.perms = [{g: linear_assignment(Pi[g]) for g in sizes} for Pi in P]
    hard = [{g: eye[g][p.to(device)] for g, p in perms.items()} for perms in result.perms]
    result.final_objective = _objective(models, spec, hard)
    return result


def merge_in_universe(state_dicts: Sequence[StateDict], spec: PermutationSpec, perms: Sequence[Mapping[str, Tensor]],
                      weights: Sequence[float] | None = None, basis: int | None = 0) -> dict[str, Tensor]:
    """Weighted average of the models in the universe (uniform by default),
    mapped back to model `basis`'s unit order, or left in the universe when
    `basis` is None. (Both compute the same function.)"""
    n = len(state_dicts)
    w = [1.0 / n] * n if weights is None else list(weights)
    if len(w) != n or abs(sum(w) - 1.0) > 1e-6:
        raise ValidationError(f"merge weights must be {n} numbers summing to 1, got {w}")
    in_u = [apply_permutation(sd, spec, p) for sd, p in zip(state_dicts, perms)]
    merged = {k: sum(wi * sd[k].float() for wi, sd in zip(w, in_u)) for k in in_u[0]}
    if basis is None:
        return merged
    return apply_permutation(merged, spec, {g: invert(p) for g, p in perms[basis].items()})
