"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, arXiv 2209.04836).

Find permutations of model B's hidden units that maximise
    sum over spec'd parameters of <W_A, pi(W_B)>
by coordinate descent: visit the permutation groups in a random order; for one
group, with every other group held fixed, the objective is linear in that
group's permutation, so the best one is a linear assignment problem on the
summed similarity matrix. Repeat until a full sweep improves nothing.
Head-structured groups (attention Q/K and V/O, see specs.py) that share one
head permutation are visited together and solved exactly by `assign`.

The similarity matrices are built with torch on the chosen device; the linear
assignment itself is scipy's (CPU), so each step copies one n x n matrix to
the host.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.permutation.specs import PermutationSpec, Perms, StateDict, check_permutation, identity_perms

Tensor = torch.Tensor


def permute_tensor(t: Tensor, groups: tuple[str | None, ...], perms: Perms, skip_axis: int | None = None) -> Tensor:
    """Permute each axis of `t` by its group's permutation, except `skip_axis`."""
    for axis, g in enumerate(groups):
        if g is not None and axis != skip_axis and g in perms:
            t = torch.index_select(t, axis, perms[g])
    return t


def unit_rows(t: Tensor, axis: int) -> Tensor:
    """(n units, everything else): the rows a similarity is taken over."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def linear_assignment(score: Tensor) -> Tensor:
    """The permutation p maximising sum_i score[i, p[i]] (scipy, on CPU)."""
    s = score.detach().double().cpu().numpy()
    rows, cols = linear_sum_assignment(s, maximize=True)
    p = np.empty(s.shape[0], dtype=np.int64)
    p[rows] = cols
    return torch.from_numpy(p)


def assign(spec: PermutationSpec, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The valid permutations maximising sum_g sum_i scores[g][i, p_g[i]]
    (CPU LongTensors), for the groups in `scores`.

    A free group is one linear assignment. The groups of one head group are
    solved jointly and exactly: for every pair of heads (a of A, b of B) and
    every such group, the best within-head assignment of block (a, b) and its
    value; the head permutation is then the linear assignment on the summed
    values, and each group keeps the within-head assignments of the chosen
    head pairs. (With the head order fixed the objective splits into
    independent blocks, so this is the exact optimum over valid
    permutations.)"""
    out: dict[str, Tensor] = {}
    for unit in spec.head_units():
        unit = [g for g in unit if g in scores]
        if not unit:
            continue
        if unit[0] not in spec.heads:
            out[unit[0]] = linear_assignment(scores[unit[0]])
            continue
        n_heads = spec.heads[unit[0]][1]
        value = np.zeros((n_heads, n_heads))
        inner: dict[str, dict[tuple[int, int], np.ndarray]] = {g: {} for g in unit}
        for g in unit:
            s = scores[g].detach().double().cpu().numpy()
            dh = s.shape[0] // n_heads
            for a in range(n_heads):
                for b in range(n_heads):
                    block = s[a * dh:(a + 1) * dh, b * dh:(b + 1) * dh]
                    rows, cols = linear_sum_assignment(block, maximize=True)
                    value[a, b] += block[rows, cols].sum()
                    inner[g][a, b] = cols[np.argsort(rows)]
        heads_rows, heads_cols = linear_sum_assignment(value, maximize=True)
        order = heads_cols[np.argsort(heads_rows)]
        for g in unit:
            dh = scores[g].shape[0] // n_heads
            out[g] = torch.from_numpy(np.concatenate([order[a] * dh + inner[g][a, order[a]]
                                                      for a in range(n_heads)]).astype(np.int64))
    return out


def group_similarity(a: Mapping[str, Tensor], b: Mapping[str, Tensor], spec: PermutationSpec, group: str,
                     perms: Perms) -> Tensor:
    """S[i, j] = similarity of A's unit i and B's unit j on every axis the
    group touches, B's other axes permuted by their current permutations."""
    total = None
    for name, axis in spec.groups[group]:
        wb = permute_tensor(b[name], spec.axes[name], perms, skip_axis=axis)
        s = unit_rows(a[name], axis) @ unit_rows(wb, axis).T
        total = s if total is None else total + s
    return total


def matching_objective(sd_a: StateDict, sd_b: StateDict, spec: PermutationSpec, perms: Perms) -> float:
    """sum over spec'd parameters of <W_A, pi(W_B)> (float64)."""
    total = 0.0
    for name, groups in spec.axes.items():
        wb = permute_tensor(sd_b[name], groups, {g: p.to(sd_b[name].device) for g, p in perms.items()})
        total += float((sd_a[name].double() * wb.double()).sum())
    return total


def _prepare(sds, spec, device):
    for sd in sds:
        spec.validate(sd)
    sizes = spec.sizes(sds[0])
    for k, sd in enumerate(sds[1:], 1):
        if spec.sizes(sd) != sizes:
            raise ValidationError(f"model {k} has group widths {spec.sizes(sd)}, model 0 has {sizes}")
    moved = [{n: sd[n].detach().to(device=device, dtype=torch.float32) for n in spec.axes} for sd in sds]
    return moved, sizes


def weight_matching(sd_a: StateDict, sd_b: StateDict, spec: PermutationSpec, *, seed: int = 0,
                    max_sweeps: int = 100, init: Perms | None = None, device: str | torch.device | None = None,
                    rtol: float = 1e-12) -> dict[str, Tensor]:
    """Permutations aligning B to A: `apply_permutation(sd_b, spec, perms)` is B
    in A's basis (unit i of aligned B is unit perms[g][i] of B).

    Coordinate descent over the groups in a random order (fixed by `seed`),
    each step one linear assignment, until a whole sweep improves nothing or
    `max_sweeps` sweeps have run. Returns CPU LongTensors."""
    device = get_device(device)
    (a, b), sizes = _prepare([sd_a, sd_b], spec, device)
    perms = {g: p.to(device) for g, p in (init or identity_perms(sizes)).items()}
    for g, p in perms.items():
        check_permutation(p, sizes[g], f"initial permutation of group {g!r}")
    spec.check_perms(perms)
    rng = np.random.default_rng(seed)
    units = spec.head_units()   # a free group, or the groups sharing one head permutation
    for _ in range(max_sweeps):
        improved = False
        for ui in rng.permutation(len(units)):
            sims = {g: group_similarity(a, b, spec, g, perms) for g in units[ui]}
            new = {g: p.to(device) for g, p in assign(spec, sims).items()}
            old_score = new_score = 0.0
            for g, s in sims.items():
                idx = torch.arange(sizes[g], device=device)
                old_score += float(s[idx, perms[g]].double().sum())
                new_score += float(s[idx, new[g]].double().sum())
            # strict improvement (relative), so ties never make it cycle forever
            if new_score > old_score + rtol * max(1.0, abs(old_score)):
                perms.update(new)
                improved = True
        if not improved:
            break
    return {g: p.cpu() for g, p in perms.items()}
