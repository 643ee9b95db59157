"""Alignment methods behind one name, as the page and the benchmark use them:
align models to a reference, merge N models, optionally REPAIR."""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from analysis.errors import HyperparameterError
from analysis.permutation.c2m3 import c2m3, merge_in_universe
from analysis.permutation.mlp import mlp_preactivations, mlp_repair_layers
from analysis.permutation.repair import repair
from analysis.permutation.specs import PermutationSpec, StateDict, apply_permutation
from analysis.permutation.weight_matching import weight_matching

METHODS = ("none", "weight_matching", "c2m3")
Method = Literal["none", "weight_matching", "c2m3"]


def _check(method: str) -> None:
    if method not in METHODS:
        raise HyperparameterError(f"alignment method must be one of {METHODS}, got {method!r}")


def align_to_first(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, seed: int = 0,
                   device: str | torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """Every model expressed in model 0's unit order: pairwise weight matching
    to model 0, or C2M3's cycle-consistent maps P_0^T P_j, or unchanged."""
    _check(method)
    if method == "none":
        return [dict(sd) for sd in sds]
    if method == "weight_matching":
        return [dict(sds[0])] + [apply_permutation(sd, spec, weight_matching(sds[0], sd, spec, seed=seed, device=device))
                                 for sd in sds[1:]]
    res = c2m3(sds, spec, seed=seed, device=device)
    return [dict(sds[0])] + [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds) if j > 0]


def merge_models(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, *, repair_x: torch.Tensor | None = None,
                 seed: int = 0, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Uniform average of N models after alignment (C2M3: in the universe,
    mapped back to model 0's basis; weight matching: every model matched to
    model 0). With `repair_x` (training inputs), REPAIR the hidden layers of
    the average (MLP state dicts)."""
    _check(method)
    if method == "c2m3":
        res = c2m3(sds, spec, seed=seed, device=device)
        merged = merge_in_universe(sds, spec, res.perms, basis=0)
        aligned = [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds)]
    else:
        aligned = align_to_first(sds, spec, method, seed=seed, device=device)
        merged = {k: sum(sd[k].float() for sd in aligned) / len(aligned) for k in aligned[0]}
    if repair_x is not None:
        merged = repair(merged, aligned, mlp_repair_layers(merged), mlp_preactivations, repair_x, device=device)
    return merged
