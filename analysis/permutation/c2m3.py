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
2 x that number (4 for MLP and conv weights); we compute its coefficients
exactly (inner products of the coefficient tensors) and take its maximum on
[0, 1] (endpoints and real roots of the derivative).
At the end each P_i is projected to the nearest permutation (a linear
assignment maximising <P_i, Pi>).
Head-structured groups (transformer attention): vertices and the final
projection are the best valid permutations (`weight_matching.assign`), so the
relaxation is the convex hull of the valid permutations rather than the full
Birkhoff polytope, and every model keeps Q/K and V/O heads together.

Cycle consistency is by construction: the pairwise permutations are
p_ij = perm_j[inv(perm_i)] and any cycle composes to the identity exactly.

Index convention (as in specs.py): `perms[i][g]` has universe unit u = model
i's unit perms[i][g][u], so `apply_permutation(sd_i, spec, perms[i])` is
model i in the universe.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from analysis.device import get_device
from analysis.errors import HyperparameterError, ValidationError
from analysis.permutation.specs import PermutationSpec, StateDict, apply_permutation, invert
from analysis.permutation.weight_matching import _prepare, assign, unit_rows, weight_matching

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


def _subsets(axes: tuple[int, ...]) -> list[frozenset]:
    return [frozenset(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class _Tracks:
    """For one model and one parameter W with permuted axes F, the partial
    transforms T_S = W with P applied on the axes in S, for every S within F.

    T_F is the model in the universe; T_{F minus a} is what the gradient for
    axis a needs. After a Frank-Wolfe step P <- (1 - t) P + t V towards a
    permutation V, every T_S is an exact combination of gathers (V is a
    permutation, so V applied to an axis is an index_select, not a matmul):
        T_S' = sum over R within S of (1 - t)^|S - R| t^|R| V_R(T_{S - R}).
    This keeps the line search and the update free of dense matmuls; only the
    gradient needs them."""

    def __init__(self, w: Tensor, groups: tuple[str | None, ...], perms: Mapping[str, Tensor]):
        # Frank-Wolfe starts at a vertex (a permutation), so T_S is a gather
        self.groups = groups
        self.full = tuple(a for a, g in enumerate(groups) if g is not None)
        self.T = {}
        for S in _subsets(self.full):
            t = w
            for a in sorted(S):
                t = torch.index_select(t, a, perms[groups[a]])
            self.T[S] = t

    def terms(self, V: Mapping[str, Tensor]) -> dict[frozenset, list[tuple[int, int, Tensor]]]:
        """For every S: [(|S - R|, |R|, V_R(T_{S - R})) for every R within S]
        (computed once per step, used by the line search and the update)."""
        out = {}
        for S in self.T:
            lst = []
            for R in _subsets(tuple(sorted(S))):
                t = self.T[S - R]
                for a in sorted(R):
                    t = torch.index_select(t, a, V[self.groups[a]])
                lst.append((len(S) - len(R), len(R), t))
            out[S] = lst
        return out

    def poly(self, terms) -> list[Tensor]:
        """T_F along the step as polynomial coefficients in t (constant first):
        (1 - t)^k t^r expanded binomially."""
        coef: list[Tensor | None] = [None] * (len(self.full) + 1)
        for k, r, g in terms[frozenset(self.full)]:
            for j in range(k + 1):
                c = math.comb(k, j) * (-1) ** j
                coef[r + j] = c * g if coef[r + j] is None else coef[r + j] + c * g
        return coef

    def step(self, t: float, terms) -> None:
        self.T = {S: sum(((1 - t) ** k) * (t ** r) * g for k, r, g in lst) for S, lst in terms.items()}


def _line_search_poly(coefs: Sequence[Sequence[Tensor]]) -> np.ndarray:
    """f along the step as polynomial coefficients (constant first), exactly,
    from the models' coefficient tensors: f = 1/2 (||sum_i M_i||^2 - sum_i ||M_i||^2)."""
    deg = max(len(c) for c in coefs) - 1
    S = [sum(c[d] for c in coefs if d < len(c)) for d in range(deg + 1)]
    out = np.zeros(2 * deg + 1)
    for d in range(deg + 1):
        for e in range(d, deg + 1):  # symmetric: off-diagonal pairs count twice
            v = float(torch.vdot(S[d].flatten(), S[e].flatten()))
            v -= sum(float(torch.vdot(c[d].flatten(), c[e].flatten())) for c in coefs if e < len(c))
            out[d + e] += (0.5 if d == e else 1.0) * v
    return out


def _pair_objective(ms: Sequence[Tensor]) -> float:
    """sum_{i<j} <M_i, M_j> = 1/2 (||sum M_i||^2 - sum ||M_i||^2), in float64."""
    s = torch.stack(ms).sum(0).double()
    return 0.5 * (float(s.pow(2).sum()) - sum(float(m.double().pow(2).sum()) for m in ms))


def _objective_from_perms(models, spec, perms) -> float:
    total = 0.0
    for name, groups in spec.axes.items():
        ms = []
        for i, m in enumerate(models):
            w = m[name]
            for a, g in enumerate(groups):
                if g is not None:
                    w = torch.index_select(w, a, perms[i][g])
            ms.append(w)
        total += _pair_objective(ms)
    return total


def _best_step(poly: np.ndarray) -> tuple[float, float]:
    """Exact maximiser on [0, 1] of the polynomial sum_k poly[k] t^k."""
    P = np.polynomial.Polynomial(poly)
    cands = [0.0, 1.0] + [float(r.real) for r in P.deriv().roots() if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0]
    vals = [float(P(t)) for t in cands]
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
    N = len(models)
    eye = {g: torch.eye(n, device=device) for g, n in sizes.items()}
    ident = {g: torch.arange(n, device=device) for g, n in sizes.items()}
    start = [dict(ident) for _ in models]
    if init == "weight_matching":
        for i in range(1, N):
            p = weight_matching(models[0], models[i], spec, seed=seed + i, device=device)
            start[i] = {g: p[g].to(device) for g in sizes}
    P = [{g: eye[g][p] for g, p in st.items()} for st in start]  # row u has its 1 at p[u]
    names = list(spec.axes)
    tracks = [{n: _Tracks(m[n], spec.axes[n], start[i]) for n in names} for i, m in enumerate(models)]
    degree = 2 * max((len(tracks[0][n].full) for n in names), default=1)

    def objective(tr) -> float:
        return sum(_pair_objective([tr[i][n].T[frozenset(tr[i][n].full)] for i in range(N)]) for n in names)

    f = objective(tracks)
    result = C2M3Result(perms=[], objective=[f])
    for it in range(max_iter):
        # gradient of f w.r.t. each P_i (i >= 1; P_0 stays the identity)
        grads = [{g: torch.zeros_like(eye[g]) for g in sizes} for _ in range(N)]
        for n in names:
            full = frozenset(tracks[0][n].full)
            ms = [tracks[i][n].T[full] for i in range(N)]
            total = torch.stack(ms).sum(0)
            for i in range(1, N):
                rest = total - ms[i]  # d f / d M_i = sum of the other models in the universe
                for a in full:
                    partial = tracks[i][n].T[full - {a}]
                    grads[i][spec.axes[n][a]] += unit_rows(rest, a) @ unit_rows(partial, a).T
        V, gap = [ident], 0.0
        for i in range(1, N):
            # vertex: the valid permutation maximising <grad, .> (whole heads move together)
            Vi = {g: p.to(device) for g, p in assign(spec, grads[i]).items()}
            for g, grad in grads[i].items():
                gap += float(grad[ident[g], Vi[g]].sum()) - float(torch.vdot(grad.flatten(), P[i][g].flatten()))
            V.append(Vi)
        result.iterations = it + 1
        if gap <= tol * max(1.0, abs(f)):
            result.converged = True
            break

        terms = [None] + [{n: tracks[i][n].terms(V[i]) for n in names} for i in range(1, N)]
        poly = np.zeros(degree + 1)
        for n in names:
            full = frozenset(tracks[0][n].full)
            coefs = [[tracks[0][n].T[full]]] + [tracks[i][n].poly(terms[i][n]) for i in range(1, N)]
            p = _line_search_poly(coefs)
            poly[: len(p)] += p
        t, f_new = _best_step(poly)
        if t <= 0.0 or f_new <= f + tol * max(1.0, abs(f)) * 1e-3:
            result.converged = True
            break
        for i in range(1, N):
            for n in names:
                tracks[i][n].step(t, terms[i][n])
            for g in sizes:
                P[i][g] = (1 - t) * P[i][g]
                P[i][g][ident[g], V[i][g]] += t
        f = f_new
        result.objective.append(f)

    # projection: the permutation with the largest overlap <P_i, Pi>
    result.perms = [assign(spec, Pi) for Pi in P]
    result.final_objective = _objective_from_perms(models, spec, [{g: p.to(device) for g, p in q.items()}
                                                                  for q in result.perms])
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
