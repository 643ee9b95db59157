"""Fisher merging (Matena & Raffel, NeurIPS 2022).

Each task model θ_t = θ₀ + τ_t gets a diagonal Fisher F_t (the empirical
Fisher: mean over n training examples of the squared gradient of
log p(y|x) at θ_t, true labels; `analysis.statistics`). The merge is the
per-entry Fisher-weighted average
    θ* = Σ_t F_t θ_t / Σ_t F_t   ⇒   δ* = Σ_t F_t τ_t / Σ_t F_t   (θ₀ cancels),
with a floor ε added to every F_t (the paper's `fisher_floor`, 1e-6), so an
entry no task is sensitive to gets the plain average. With equal Fishers it
is exactly weight averaging. Every parameter, 1-D included, is weighted.

Differences from the paper, named: `alpha` scales the merged delta (1 = the
paper); `normalise` (off = the paper) divides each task's Fisher by its total
mass over the model first, so a task whose loss is larger in scale does not
dominate (FusionBench offers the same switch). The paper's per-model
coefficients λ_t are all 1.
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha


def n_examples(default: int = 256) -> Hyperparameter:
    return Hyperparameter("n_examples", "int", default, 16, 4096, 16,
                          "examples per task used to compute the data statistics (a fixed, seeded subset of train)")


def _fishers(inputs, params, ctx):
    fishers = inputs.fisher(n=params["n_examples"])
    if not params["normalise"]:
        return fishers, None
    totals = {t: sum(float(f.double().sum()) for f in fs.values()) for t, fs in fishers.items()}
    return fishers, totals


def fisher_average(taus: torch.Tensor, fishers: torch.Tensor, floor: float) -> torch.Tensor:
    """Σ_t F_t τ_t / Σ_t F_t over the task axis (dim 0), with F_t + floor."""
    f = fishers + floor
    return (f * taus).sum(0) / f.sum(0)


def _fisher(group, params, ctx):
    fishers, totals = ctx.state
    tasks = ctx.inputs.tasks
    out = {}
    for name in group.names:
        taus = group.deltas(name)
        f = torch.stack([fishers[t][name].to(taus.device, torch.float32) for t in tasks])
        if totals is not None:
            f = f / torch.tensor([max(totals[t], 1e-30) for t in tasks], device=f.device).reshape(-1, *[1] * (f.ndim - 1))
        out[name] = params["alpha"] * fisher_average(taus, f, params["fisher_floor"])
    return out


FISHER = MergeMethod(
    "fisher", "per-entry average weighted by each task's diagonal Fisher", _fisher,
    (n_examples(), alpha(1.0),
     Hyperparameter("fisher_floor", "float", 1e-6, 0.0, 1e-2, 1e-6,
                    "ε added to every Fisher entry (the paper's floor): entries no task is sensitive to are averaged"),
     Hyperparameter("normalise", "bool", False, help="divide each task's Fisher by its total mass first "
                    "(off = the paper)")),
    needs=Needs(labelled_data=True, gradients=True), prepare=_fishers,
    peak_memory="the T diagonal Fishers (T × the model's size, on the CPU) plus one parameter group",
    reference="Matena & Raffel, Merging models with Fisher-weighted averaging, NeurIPS 2022 (arXiv 2111.09832)")
