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
        return [dict(sds[0])] + [apply_permutation(sd, spec, weight_matching(sds[0], sd, spec, seed=seed,
                                                                             device=device)) for sd in sds[1:]]
    res = c2m3(sds, spec, seed=seed, device=device)
    return [dict(sds[0])] + [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds) if j > 0]


def merge_models(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, *,
                 repair_x: torch.Tensor | None = None, seed: int = 0, device: str | torch.device | None = None,
                 c2m3_result=None) -> dict[str, torch.Tensor]:
    """Uniform average of N models after alignment (C2M3: in the universe,
    mapped back to model 0's basis; weight matching: every model matched to
    model 0). With `repair_x` (training inputs), REPAIR the hidden layers of
    the average (MLP state dicts). `c2m3_result` reuses a finished C2M3 run
    on the same models."""
    _check(method)
    if method == "c2m3":
        res = c2m3_result or c2m3(sds, spec, seed=seed, device=device)
        merged = merge_in_universe(sds, spec, res.perms, basis=0)
        aligned = [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds)]
    else:
        aligned = align_to_first(sds, spec, method, seed=seed, device=device)
        merged = {k: sum(sd[k].float() for sd in aligned) / len(aligned) for k in aligned[0]}
    if repair_x is not None:
        merged = repair(merged, aligned, mlp_repair_layers(merged), mlp_preactivations, repair_x, device=device)
    return merged


def compare_paths(sd_a: StateDict, sd_b: StateDict, spec: PermutationSpec, eval_fn, lambdas: Sequence[float],
                  method: Method, repair_x: torch.Tensor | None = None, seed: int = 0,
                  device: str | torch.device | None = None):
    """Interpolation curves A -> B: always the naive path, plus the path after
    aligning B to A with `method`, plus (with `repair_x`) that path with REPAIR
    at every interior point. Returns (curves: lam, metric, value, method;
    barriers: method, metric, path, midpoint; see analysis.barriers)."""
    import pandas as pd

    from analysis.permutation.barrier import barriers, interpolation_curve
    _check(method)
    b_al = sd_b if method == "none" else align_to_first([sd_a, sd_b], spec, method, seed=seed, device=device)[1]
    layers = mlp_repair_layers(sd_a)

    def rep(sd, lam):
        return repair(sd, [sd_a, b_al], layers, mlp_preactivations, repair_x, weights=[1 - lam, lam], device=device)

    label = {"none": "naive", "weight_matching": "weight matching", "c2m3": "C2M3"}[method]
    runs = [("naive", sd_b, None)]
    if method != "none":
        runs.append((label, b_al, None))
    if repair_x is not None:
        runs.append((f"{label} + REPAIR", b_al, rep))
    curves, rows = [], []
    for name, other, fn in runs:
        c = interpolation_curve(eval_fn, sd_a, other, lambdas, repair_fn=fn).assign(method=name)
        curves.append(c)
        for metric in c["metric"].unique():
            rows.append({"method": name, "metric": metric, **barriers(c, metric)})
    return pd.concat(curves, ignore_index=True), pd.DataFrame(rows)


def aligned_planes(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, eval_fn, resolution: int = 9,
                   seed: int = 0, device: str | torch.device | None = None, names=("A", "B", "C")):
    """Loss planes through three models: naive, and (unless method is "none")
    with B and C aligned to A. Returns {label: (grid, points)}."""
    from analysis.permutation.plane import loss_plane
    _check(method)
    out = {"naive": loss_plane(sds, eval_fn, resolution, names=names)}
    if method != "none":
        label = {"weight_matching": "weight matching", "c2m3": "C2M3"}[method]
        out[f"aligned ({label})"] = loss_plane(align_to_first(sds, spec, method, seed=seed, device=device), eval_fn,
                                               resolution, names=names)
    return out


def cycle_errors(sds: Sequence[StateDict], spec: PermutationSpec, seed: int = 0,
                 device: str | torch.device | None = None, c2m3_result=None):
    """Cycle error around 0 -> 1 -> ... -> N-1 -> 0 for independent pairwise
    weight matching and for C2M3: tidy table method, group, value."""
    import pandas as pd

    from analysis.permutation.specs import cycle_error
    n = len(sds)
    cyc = [(k, (k + 1) % n) for k in range(n)]
    wm = cycle_error([weight_matching(sds[i], sds[j], spec, seed=seed, device=device) for i, j in cyc])
    res = c2m3_result or c2m3(sds, spec, seed=seed, device=device)
    c2 = cycle_error([res.pairwise(i, j) for i, j in cyc])
    return pd.DataFrame([{"method": m, "group": g, "value": v}
                         for m, e in (("pairwise weight matching", wm), ("C2M3", c2)) for g, v in e.items()])
