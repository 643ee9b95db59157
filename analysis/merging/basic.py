"""Weight averaging and Task Arithmetic (Ilharco et al., 2023)."""
from __future__ import annotations

from analysis.merging.base import MergeMethod, alpha
from analysis.merging.common import stacked


def _weight_averaging(tvs, params, ctx):
    # mean_t τ_t: θ₀ + this is the plain average of the fine-tuned models
    return {name: stacked(tvs, name, ctx.device).mean(0) for name in tvs.param_names}


def _task_arithmetic(tvs, params, ctx):
    a = params["alpha"]
    return {name: a * stacked(tvs, name, ctx.device).sum(0) for name in tvs.param_names}


WEIGHT_AVERAGING = MergeMethod(
    "weight_averaging", "mean of the task vectors (the fine-tuned models' average)", _weight_averaging, (),
    reference="Wortsman et al., Model soups, ICML 2022")

TASK_ARITHMETIC = MergeMethod(
    "task_arithmetic", "α × the sum of the task vectors", _task_arithmetic, (alpha(0.3),),
    reference="Ilharco et al., Editing models with task arithmetic, ICLR 2023")
