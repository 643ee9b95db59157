"""Weight averaging and Task Arithmetic (Ilharco et al., 2023)."""
from __future__ import annotations

from analysis.merging.base import MergeMethod, alpha
from analysis.merging.common import scaled


def _weight_averaging(group, params, ctx):
    # mean_t τ_t: θ₀ + this is the plain average of the fine-tuned models
    return {name: group.deltas(name).mean(0) for name in group.names}


def _task_arithmetic(group, params, ctx):
    # the sum is kept for a resident set (MergeInputs.task_sum): an α move reads one model's worth instead of
    # all T task vectors (quick demo, 2-core CPU: 0.051 → 0.014 s a move); at α = 1 the kept sum itself
    return {name: scaled(params["alpha"], ctx.inputs.task_sum(name)) for name in group.names}


WEIGHT_AVERAGING = MergeMethod(
    "weight_averaging", "mean of the task vectors (the fine-tuned models' average)", _weight_averaging,
    reference="Wortsman et al., Model soups, ICML 2022")

TASK_ARITHMETIC = MergeMethod(
    "task_arithmetic", "α × the sum of the task vectors", _task_arithmetic, (alpha(0.3),),
    peak_memory="one parameter group, plus for a resident set the task sum of every parameter (one model's "
                "worth, kept in the inputs' memo so an α change reads no task vector)",
    reference="Ilharco et al., Editing models with task arithmetic, ICLR 2023")
