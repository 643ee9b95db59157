"""REPAIR-style renormalisation (Jordan et al., "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair", arXiv 2211.08403).

Averaging aligned models shrinks the spread of hidden pre-activations
("variance collapse"). REPAIR resets, for every hidden unit, the mean and
standard deviation of the merged model's pre-activation (measured on training
data) to the interpolation of the endpoints' statistics:

    target mean = sum_i w_i mu_i,  target std = sum_i w_i sigma_i.

Without BatchNorm the affine correction z' = (z - mu_m) sigma_t / sigma_m + mu_t
is folded into the layer that produces z: W' = s W (row-wise), b' = s (b - mu_m)
+ mu_t with s = sigma_t / sigma_m. Layers are corrected in forward order, each
after re-measuring the merged model with the earlier corrections in place.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from analysis.device import get_device
from analysis.errors import HyperparameterError, ValidationError
from analysis.permutation.specs import StateDict

Tensor = torch.Tensor
PreactFn = Callable[[StateDict, Tensor], Sequence[Tensor]]


@torch.no_grad()
def unit_statistics(sd: StateDict, preact_fn: PreactFn, x: Tensor, batch_size: int = 4096,
                    device: str | torch.device | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per-unit (mean, std) of each pre-activation `preact_fn` returns; units
    are axis 1 (features of a Linear, channels of a conv), every other axis is
    averaged over. Computed on `device`, returned on the CPU (like `repair`'s
    state dict), so callers can combine them with either."""
    return [(m.cpu(), s.cpu()) for m, s in _unit_statistics(sd, preact_fn, x, batch_size, get_device(device))]


def _unit_statistics(sd: StateDict, preact_fn: PreactFn, x: Tensor, batch_size: int,
                     device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """`unit_statistics`, left on `device` (repair combines them there)."""
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}
    sums = sq = None
    count = 0
    for s in range(0, len(x), batch_size):
        pre = preact_fn(params, x[s:s + batch_size].to(device))
        flat = [p.movedim(1, -1).reshape(-1, p.shape[1]).double() for p in pre]
        if sums is None:
            sums = [f.sum(0) for f in flat]
            sq = [f.pow(2).sum(0) for f in flat]
        else:
            sums = [a + f.sum(0) for a, f in zip(sums, flat)]
            sq = [a + f.pow(2).sum(0) for a, f in zip(sq, flat)]
        count += flat[0].shape[0] if flat else 0
    out = []
    for a, b in zip(sums or [], sq or []):
        mean = a / count
        var = (b / count - mean.pow(2)).clamp_min(0.0)
        out.append((mean.float(), var.sqrt().float()))
    return out


@torch.no_grad()
def repair(merged: StateDict, endpoints: Sequence[StateDict], layers: Sequence[tuple[str, str]],
           preact_fn: PreactFn, x: Tensor, weights: Sequence[float] | None = None, eps: float = 1e-5,
           batch_size: int = 4096, device: str | torch.device | None = None) -> dict[str, Tensor]:
    """The merged state dict with every listed layer's output statistics reset.

    `endpoints` must be in the merged model's unit order (aligned first).
    `layers[l]` = (weight name, bias name) of the layer producing the l-th
    pre-activation of `preact_fn`; `weights` are the interpolation weights
    (uniform by default; [1 - lam, lam] on a two-model path)."""
    n = len(endpoints)
    w = [1.0 / n] * n if weights is None else [float(v) for v in weights]
    if len(w) != n or abs(sum(w) - 1.0) > 1e-6 or min(w) < 0:
        raise HyperparameterError(f"REPAIR weights must be {n} non-negative numbers summing to 1, got {w}")
    for wn, bn in layers:
        if wn not in merged or bn not in merged:
            raise ValidationError(f"REPAIR folds its correction into {wn!r} and {bn!r}; the merged state dict lacks "
                                  f"{[k for k in (wn, bn) if k not in merged]}")
    device = get_device(device)
    end_stats = [_unit_statistics(sd, preact_fn, x, batch_size, device) for sd in endpoints]
    if any(len(s) != len(layers) for s in end_stats):
        raise ValidationError(f"preact_fn returns {len(end_stats[0])} pre-activations but {len(layers)} layers "
                              "were given to correct")
    out = {k: v.to(device=device, dtype=torch.float32).clone() for k, v in merged.items()}
    for l, (wn, bn) in enumerate(layers):
        mu_t = sum(wi * s[l][0] for wi, s in zip(w, end_stats))
        sd_t = sum(wi * s[l][1] for wi, s in zip(w, end_stats))
        mu_m, sd_m = _unit_statistics(out, preact_fn, x, batch_size, device)[l]
        scale = sd_t / (sd_m + eps)
        shape = (-1,) + (1,) * (out[wn].dim() - 1)
        out[wn] = out[wn] * scale.view(shape)
        out[bn] = (out[bn] - mu_m) * scale + mu_t
    return {k: v.cpu() for k, v in out.items()}
