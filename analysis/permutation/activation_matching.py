"""Activation matching: align B's units to A's by the correlation of their
activations on the same data (Verma & Elbayad, "Merging Text Transformer
Models from Different Initializations", TMLR 2024, following Git Re-Basin's
activation matching).

For every permutation group, C[i, j] = Pearson correlation, over all samples
(for transformers: all non-padding tokens), between unit i of A and unit j of
B. A group read at several places (the residual stream after every
LayerNorm; queries and keys) sums its correlation matrices. Each group's
permutation maximises sum_i C[i, p[i]]: one linear assignment, or, for
head-structured groups, the exact joint solve of `weight_matching.assign`
(within-head assignments for every pair of heads, then the head assignment on
their summed correlations, one head permutation shared by Q/K and V/O).
Unlike weight matching, the groups do not interact: one pass, no sweeps.

Stated choices: correlations are summed, not averaged, over the places a
group is read (the assignment is the same up to scale); queries and keys of
a head share one within-head permutation (the paper's Q, K, V features per
head are matched jointly; here V's permutation is its own, paired with the
output projection, which is the finer symmetry the network has).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.permutation.specs import PermutationSpec, StateDict
from analysis.permutation.weight_matching import assign

Tensor = torch.Tensor
FeaturesFn = Callable[[StateDict, Tensor], Mapping[str, Sequence[Tensor]]]


class _Moments:
    """Running sums for a cross-correlation matrix, in float64."""

    def __init__(self):
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        if self.sab is None:
            self.sa, self.sb = a.sum(0), b.sum(0)
            self.saa, self.sbb = a.pow(2).sum(0), b.pow(2).sum(0)
            self.sab = a.T @ b
        else:
            self.sa += a.sum(0)
            self.sb += b.sum(0)
            self.saa += a.pow(2).sum(0)
            self.sbb += b.pow(2).sum(0)
            self.sab += a.T @ b
        self.n += a.shape[0]

    def correlation(self, eps: float = 1e-12) -> Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - torch.outer(ma, mb)
        sa = (self.saa / self.n - ma.pow(2)).clamp_min(0).sqrt()
        sb = (self.sbb / self.n - mb.pow(2)).clamp_min(0).sqrt()
        return cov / (torch.outer(sa, sb) + eps)


@torch.no_grad()
def activation_correlations(sd_a: StateDict, sd_b: StateDict, features_fn: FeaturesFn, x: Tensor,
                            batch_size: int = 64, device: str | torch.device | None = None) -> dict[str, Tensor]:
    """group -> (n, n) correlation of A's units (rows) with B's (columns),
    summed over the places the group is read. `features_fn(sd, batch)`
    returns {group: [(samples, width), ...]} for a batch of `x`."""
    device = get_device(device)
    pa = {k: v.to(device=device, dtype=torch.float32) for k, v in sd_a.items()}
    pb = {k: v.to(device=device, dtype=torch.float32) for k, v in sd_b.items()}
    moments: dict[str, list[_Moments]] = {}
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(device)
        fa, fb = features_fn(pa, xb), features_fn(pb, xb)
        for g, feats in fa.items():
            ms = moments.setdefault(g, [_Moments() for _ in feats])
            for m, a, b in zip(ms, feats, fb[g]):
                m.add(a, b)
    if not moments:
        raise ValidationError("activation matching got no data (an empty input tensor)")
    return {g: sum(m.correlation() for m in ms).float() for g, ms in moments.items()}


def activation_matching(sd_a: StateDict, sd_b: StateDict, spec: PermutationSpec, features_fn: FeaturesFn,
                        x: Tensor, batch_size: int = 64,
                        device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Permutations aligning B to A (same convention as `weight_matching`:
    `apply_permutation(sd_b, spec, perms)` is B in A's basis)."""
    spec.validate(sd_a)
    spec.validate(sd_b)
    corr = activation_correlations(sd_a, sd_b, features_fn, x, batch_size, device)
    missing = sorted(set(spec.groups) - set(corr))
    if missing:
        raise ValidationError(f"features_fn returned no activations for groups {missing}; it returned {sorted(corr)}")
    sizes = spec.sizes(sd_a)
    for g, c in corr.items():
        if g in sizes and c.shape != (sizes[g], sizes[g]):
            raise ValidationError(f"activations of group {g!r} have {c.shape[0]} units, the spec's width is {sizes[g]}")
    return assign(spec, {g: corr[g] for g in spec.groups})
