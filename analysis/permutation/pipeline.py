"""Alignment methods behind one name, as the page and the benchmark use them:
align models to a reference, merge N models, optionally REPAIR.

A `Family` says how to read one kind of network: which (weight, bias) pairs
REPAIR corrects and the activations it measures, the activations activation
matching correlates per group, and how C2M3 starts. `MLP` (the default) and
`bert_family(n_heads)` are provided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from analysis.errors import HyperparameterError, ValidationError
from analysis.permutation.activation_matching import activation_matching
from analysis.permutation.c2m3 import c2m3, merge_in_universe
from analysis.permutation.mlp import mlp_group_features, mlp_preactivations, mlp_repair_layers
from analysis.permutation.repair import repair
from analysis.permutation.specs import PermutationSpec, StateDict, apply_permutation
from analysis.permutation.weight_matching import weight_matching

METHODS = ("none", "weight_matching", "activation_matching", "c2m3")
Method = Literal["none", "weight_matching", "activation_matching", "c2m3"]
LABELS = {"none": "naive", "weight_matching": "weight matching", "activation_matching": "activation matching",
          "c2m3": "C2M3"}


@dataclass(frozen=True)
class Family:
    repair_layers: Callable[[StateDict], list[tuple[str, str]]]
    preactivations: Callable            # (sd, x) -> [(samples, units)], in repair_layers' order
    group_features: Callable            # (sd, x) -> {group: [(samples, units), ...]}
    c2m3_init: str = "identity"


MLP = Family(mlp_repair_layers, mlp_preactivations, mlp_group_features)


def bert_family(n_heads: int, eps: float = 1e-12) -> Family:
    """BERT encoders (analysis.permutation.transformer). C2M3 starts from
    pairwise weight matching: from the identity, Frank-Wolfe over the valid
    (head-structured) permutations stops in poor local optima even on
    permuted copies (tests/test_permutation_transformer.py)."""
    from analysis.permutation.transformer import group_features, repair_preactivations, repair_targets
    return Family(repair_targets, repair_preactivations(n_heads, eps),
                  lambda sd, x: group_features(sd, x, n_heads, eps), c2m3_init="weight_matching")


def _check(method: str) -> None:
    if method not in METHODS:
        raise HyperparameterError(f"alignment method must be one of {METHODS}, got {method!r}")


def _run_c2m3(sds, spec, family, seed, device):
    return c2m3(sds, spec, seed=seed, device=device, init=family.c2m3_init)


def align_to_first(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, seed: int = 0,
                   device: str | torch.device | None = None, family: Family = MLP,
                   match_x: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Every model expressed in model 0's unit order: pairwise weight
    matching or activation matching (on inputs `match_x`) to model 0, or
    C2M3's cycle-consistent maps P_0^T P_j, or unchanged."""
    _check(method)
    if method == "none":
        return [dict(sd) for sd in sds]
    if method == "weight_matching":
        return [dict(sds[0])] + [apply_permutation(sd, spec, weight_matching(sds[0], sd, spec, seed=seed,
                                                                             device=device)) for sd in sds[1:]]
    if method == "activation_matching":
        if match_x is None:
            raise ValidationError("activation matching needs inputs (match_x) to correlate activations on")
        return [dict(sds[0])] + [apply_permutation(sd, spec, activation_matching(
            sds[0], sd, spec, family.group_features, match_x, device=device)) for sd in sds[1:]]
    res = _run_c2m3(sds, spec, family, seed, device)
    return [dict(sds[0])] + [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds) if j > 0]


def merge_models(sds: Sequence[StateDict], spec: PermutationSpec, method: Method, *,
                 repair_x: torch.Tensor | None = None, seed: int = 0, device: str | torch.device | None = None,
                 c2m3_result=None, family: Family = MLP, match_x: torch.Tensor | None = None,
                 aligned: Sequence[StateDict] | None = None) -> dict[str, torch.Tensor]:
    """Uniform average of N models after alignment (C2M3: in the universe,
    mapped back to model 0's basis; weight / activation matching: every
    model matched to model 0). With `repair_x` (training inputs), REPAIR the
    average (`family.repair_layers`). `c2m3_result` reuses a finished C2M3
    run on the same models; `aligned` reuses models already aligned to 0."""
    _check(method)
    if method == "c2m3":
        res = c2m3_result or _run_c2m3(sds, spec, family, seed, device)
        merged = merge_in_universe(sds, spec, res.perms, basis=0)
        aligned = [apply_permutation(sd, spec, res.pairwise(0, j)) for j, sd in enumerate(sds)]
    else:
        if aligned is None:
            aligned = align_to_first(sds, spec, method, seed=seed, device=device, family=family, match_x=match_x)
        merged = {k: sum(sd[k].float() for sd in aligned) / len(aligned) for k in aligned[0]}
    if repair_x is not None:
        merged = repair(merged, aligned, family.repair_layers(merged), family.preactivations, repair_x,
                        device=device)
    return merged


def compare_paths(sd_a: StateDict, sd_b: StateDict, spec: PermutationSpec, eval_fn, lambdas: Sequence[float],
                  method: Method, repair_x: torch.Tensor | None = None, seed: int = 0,
                  device: str | torch.device | None = None, family: Family = MLP,
                  match_x: torch.Tensor | None = None, b_aligned: StateDict | None = None):
    """Interpolation curves A -> B: always the naive path, plus the path after
    aligning B to A with `method` (or `b_aligned`, already aligned), plus (with
    `repair_x`) that path with REPAIR at every interior point. Returns
    (curves: lam, metric, value, method; barriers: method, metric, path,
    midpoint; see analysis.barriers)."""
    import pandas as pd

    from analysis.permutation.barrier import barriers, interpolation_curve
    _check(method)
    b_al = b_aligned
    if b_al is None:
        b_al = sd_b if method == "none" else align_to_first([sd_a, sd_b], spec, method, seed=seed, device=device,
                                                             family=family, match_x=match_x)[1]
    layers = family.repair_layers(sd_a)

    def rep(sd, lam):
        return repair(sd, [sd_a, b_al], layers, family.preactivations, repair_x, weights=[1 - lam, lam],
                      device=device)

    label = LABELS[method]
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
                   seed: int = 0, device: str | torch.device | None = None, names=("A", "B", "C"),
                   family: Family = MLP, match_x: torch.Tensor | None = None):
    """Loss planes through three models: naive, and (unless method is "none")
    with B and C aligned to A. Returns {label: (grid, points)}."""
    from analysis.permutation.plane import loss_plane
    _check(method)
    out = {"naive": loss_plane(sds, eval_fn, resolution, names=names)}
    if method != "none":
        out[f"aligned ({LABELS[method]})"] = loss_plane(
            align_to_first(sds, spec, method, seed=seed, device=device, family=family, match_x=match_x), eval_fn,
            resolution, names=names)
    return out


def cycle_errors(sds: Sequence[StateDict], spec: PermutationSpec, seed: int = 0,
                 device: str | torch.device | None = None, c2m3_result=None, family: Family = MLP):
    """Cycle error around 0 -> 1 -> ... -> N-1 -> 0 for independent pairwise
    weight matching and for C2M3: tidy table method, group, value."""
    import pandas as pd

    from analysis.permutation.specs import cycle_error
    n = len(sds)
    cyc = [(k, (k + 1) % n) for k in range(n)]
    wm = cycle_error([weight_matching(sds[i], sds[j], spec, seed=seed, device=device) for i, j in cyc])
    res = c2m3_result or _run_c2m3(sds, spec, family, seed, device)
    c2 = cycle_error([res.pairwise(i, j) for i, j in cyc])
    return pd.DataFrame([{"method": m, "group": g, "value": v}
                         for m, e in (("pairwise weight matching", wm), ("C2M3", c2)) for g, v in e.items()])
