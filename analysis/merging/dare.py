"""DARE (Yu et al., ICML 2024): drop and rescale, then a base rule.

Each entry of each task vector is dropped with probability p and the kept
entries are multiplied by 1/(1−p), so every entry keeps its expectation;
then Task Arithmetic or TIES merges the sparsified vectors. The random mask
of (task, parameter) comes from a generator seeded by (seed, task index,
parameter name), so a merge is reproducible and independent of parameter
order.
"""
from __future__ import annotations

import zlib

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha
from analysis.merging.ties import density, memo_thresholds, model_thresholds, scope, ties_group


def mask_generator(seed: int, task_index: int, name: str) -> torch.Generator:
    """The CPU generator of one (task, parameter) random mask: fixed by (seed,
    task index, parameter name), so a merge is reproducible and independent of
    the order parameters are visited in (DARE, DELLA)."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + task_index * 7919
                                                      + zlib.crc32(name.encode())) % (2 ** 63 - 1))


def drop_and_rescale(tau: torch.Tensor, p: float, seed: int, name: str) -> torch.Tensor:
    """(T, *shape) -> the same with entries dropped w.p. p, kept ones × 1/(1−p)."""
    if p == 0.0:
        return tau
    out = torch.empty_like(tau)
    for t in range(tau.shape[0]):
        keep = torch.rand(tau.shape[1:], generator=mask_generator(seed, t, name)) >= p
        out[t] = torch.where(keep.to(tau.device), tau[t] / (1.0 - p), torch.zeros_like(tau[t]))
    return out


def _dropped(inputs, params):
    p, seed = params["drop_rate"], params["seed"]
    return lambda name: drop_and_rescale(inputs.deltas(name), p, seed, name)


def _model_scope(inputs, params, ctx):
    if params["base"] != "ties" or params["scope"] != "model":
        return None
    config = ("dare_thresholds", params["drop_rate"], params["seed"], params["density"])
    return memo_thresholds(ctx, config, lambda: model_thresholds(
        _dropped(inputs, params), list(inputs.tvs.param_names), len(inputs.tasks), params["density"]))


def _dare(group, params, ctx):
    get = _dropped(ctx.inputs, params)
    if params["base"] == "ties":
        return ties_group(get, group.names, group.n_tasks, params["density"], params["alpha"], ctx.state)
    return {name: params["alpha"] * get(name).sum(0) for name in group.names}


DARE = MergeMethod(
    "dare", "drop entries with probability p, rescale by 1/(1−p), then Task Arithmetic or TIES", _dare,
    (Hyperparameter("drop_rate", "float", 0.5, 0.0, 0.99, 0.01, "probability p of dropping each entry"),
     Hyperparameter("base", "choice", "task_arithmetic", help="rule applied after drop-and-rescale",
                    choices=("task_arithmetic", "ties")),
     alpha(0.3),
     Hyperparameter("seed", "int", 0, 0, 2 ** 31 - 1, 1, "random seed of the drop masks"),
     density(), scope()),
    prepare=_model_scope,
    peak_memory="one parameter's T deltas and their dropped copy (base='ties', scope='model': the threshold "
                "pass streams the model twice, drawing the same seeded masks each time, before the merge)",
    reference="Yu et al., Language models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)")
