"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, arXiv 2209.04836).

Find permutations of model B's hidden units that maximise
    sum over spec'd parameters of <W_A, pi(W_B)>
by coordinate descent: visit the permutation groups in a random order; for one
group, with every other group held fixed, the objective is linear in that
group's permutation, so the best one is a linear assignment problem on the
summed similarity matrix. Repeat until a full sweep improves nothing.

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
    rng = np.random.default_rng(seed)
    groups = list(sizes)
    for _ in range(max_sweeps):
        improved = False
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            s = group_similarity(a, b, spec, g, perms)
            new = linear_assignment(s).to(device)
            idx = torch.arange(sizes[g], device=device)
            old_score = float(s[idx, perms[g]].double().sum())
            new_score = float(s[idx, new].double().sum())
            # strict improvement (relative), so ties never make it cycle forever
            if new_score > old_score + rtol * max(1.0, abs(old_score)):
                perms[g] = new
                improved = True
        if not improved:
            break
    return {g: p.cpu() for g, p in perms.items()}
