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
from analysis.merging.common import stacked
from analysis.merging.ties import density, scope, ties_core


def drop_and_rescale(tau: torch.Tensor, p: float, seed: int, name: str) -> torch.Tensor:
    """(T, *shape) -> the same with entries dropped w.p. p, kept ones × 1/(1−p)."""
    if p == 0.0:
        return tau
    out = torch.empty_like(tau)
    for t in range(tau.shape[0]):
        g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + t * 7919 + zlib.crc32(name.encode()))
                                                      % (2 ** 63 - 1))
        keep = torch.rand(tau.shape[1:], generator=g) >= p
        out[t] = torch.where(keep.to(tau.device), tau[t] / (1.0 - p), torch.zeros_like(tau[t]))
    return out


def _dare(tvs, params, ctx):
    p, seed = params["drop_rate"], params["seed"]

    def get(name):
        return drop_and_rescale(stacked(tvs, name, ctx.device), p, seed, name)

    names = list(tvs.param_names)
    if params["base"] == "ties":
        return ties_core(get, names, len(tvs.tasks), params["density"], params["scope"], params["alpha"])
    return {name: params["alpha"] * get(name).sum(0) for name in names}


DARE = MergeMethod(
    "dare", "drop entries with probability p, rescale by 1/(1−p), then Task Arithmetic or TIES", _dare,
    (Hyperparameter("drop_rate", "float", 0.5, 0.0, 0.99, 0.01, "probability p of dropping each entry"),
     Hyperparameter("base", "choice", "task_arithmetic", help="rule applied after drop-and-rescale",
                    choices=("task_arithmetic", "ties")),
     alpha(0.3),
     Hyperparameter("seed", "int", 0, 0, 2 ** 31 - 1, 1, "random seed of the drop masks"),
     density(), scope()),
    reference="Yu et al., Language models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)")
