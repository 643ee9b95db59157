"""LiNeS (Wang et al., ICLR 2025): layer-increasing scaling of a merged task vector.

"LiNeS: Post-training layer scaling prevents forgetting and enhances model
merging" (arXiv 2410.17146), multi-task merging as in the paper and its code:

1. a base merge gives the multi-task vector τ_MTL: Task Arithmetic's plain
   sum Σ_t τ_t, or TIES (trim each task to its top `density`, elect signs,
   disjoint mean; the paper's TIES keeps 20 % over the whole task vector);
2. every parameter of block ℓ (ℓ = 1 … L) is scaled by
   λ(ℓ) = α + β·(ℓ − 1)/(L − 1), so shallow blocks stay near the pre-trained
   model; parameters outside the blocks (embeddings, final norm, pooler) get α;
3. α = ‖Σ_t τ_t‖₁ / (T · ‖τ_MTL‖₁), with whole-model L1 norms (the code's
   rule): 1/T for Task Arithmetic, and for TIES the value that gives τ_MTL the
   L1 norm of the average task vector. β is what the paper tunes on validation
   (its grid is 0.1, 0.2, …, 1.0).

Blocks and ℓ come from the parameter names (`TaskVectorSet.depth`: 'layer.3.',
'blocks.3.', 'h.3.' …; block index i is ℓ = i + 1) and L is the deepest block
index + 1. With a single block (L = 1) λ = α everywhere.

Deliberate differences from the paper's code:
- `alpha_scale` κ multiplies α (κ = 1 is the paper); it does not scale β.
  With base Task Arithmetic and β = 0, LiNeS is Task Arithmetic at α = κ/T.
- the code finds blocks by the substring '.{i}.' with L fixed per model
  (12 for ViT-B); here by the name rule shared with every per-layer view.
- if τ_MTL is zero everywhere (nothing survives TIES), α = κ/T instead of a
  division by zero.
- default β = 0.5, the middle of the paper's grid (the paper picks β per
  benchmark on validation data).
"""
from __future__ import annotations

from analysis.merging.base import Hyperparameter, MergeMethod
from analysis.merging.ties import density, model_thresholds, scope, ties_group


def layer_scale(depth: int | None, n_blocks: int, alpha: float, beta: float) -> float:
    """λ(ℓ) = α + β·(ℓ−1)/(L−1) for block index depth = ℓ − 1; α outside the blocks or when L = 1."""
    if depth is None or n_blocks <= 1:
        return alpha
    return alpha + beta * depth / (n_blocks - 1)


def _base_merge(get, names, n_tasks, params, thresholds) -> dict:
    """τ_MTL for `names`: the plain sum, or TIES' disjoint mean (no scaling)."""
    if params["base"] == "ties":
        return ties_group(get, names, n_tasks, params["density"], 1.0, thresholds)
    return {name: get(name).sum(0) for name in names}


def _norm_ratio(inputs, params, thresholds) -> float:
    """‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁ over the whole model (1 for Task Arithmetic)."""
    if params["base"] == "task_arithmetic":
        return 1.0
    summed = merged = 0.0
    n_tasks = len(inputs.tasks)
    for name in inputs.tvs.param_names:
        summed += float(inputs.deltas(name).sum(0).double().abs().sum())
        merged += float(_base_merge(inputs.deltas, [name], n_tasks, params, thresholds)[name].double().abs().sum())
    return summed / merged if merged > 0 else 1.0


def _prepare(inputs, params, ctx):
    tvs = inputs.tvs
    depths = {name: tvs.depth(name) for name in tvs.param_names}
    n_blocks = max((d for d in depths.values() if d is not None), default=-1) + 1
    key = ("lines_base", params["base"], params["density"], params["scope"], str(inputs.device))
    if key not in ctx.memo:   # a β or κ change re-uses the trim thresholds and the norm ratio
        thresholds = None
        if params["base"] == "ties" and params["scope"] == "model":
            thresholds = model_thresholds(inputs.deltas, list(tvs.param_names), len(inputs.tasks),
                                          params["density"])
        ctx.memo[key] = (thresholds, _norm_ratio(inputs, params, thresholds))
    thresholds, ratio = ctx.memo[key]
    alpha = params["alpha_scale"] * ratio / len(inputs.tasks)
    return {"depths": depths, "n_blocks": n_blocks, "thresholds": thresholds, "alpha": alpha}


def _lines(group, params, ctx):
    state = ctx.state
    base = _base_merge(group.deltas, group.names, group.n_tasks, params, state["thresholds"])
    return {name: layer_scale(state["depths"][name], state["n_blocks"], state["alpha"], params["beta"]) * base[name]
            for name in group.names}


LINES = MergeMethod(
    "lines", "scale the merged task vector by depth: α at the first block rising linearly to α + β at the last",
    _lines,
    (Hyperparameter("beta", "float", 0.5, 0.0, 2.0, 0.05,
                    "β: extra scale of the deepest block over the first (λ(ℓ) = α + β·(ℓ−1)/(L−1))"),
     Hyperparameter("base", "choice", "task_arithmetic", choices=("task_arithmetic", "ties"),
                    help="merge whose result is scaled: Task Arithmetic's sum or TIES' disjoint mean"),
     Hyperparameter("alpha_scale", "float", 1.0, 0.0, 3.0, 0.05,
                    "κ: α = κ·‖Σ_t τ_t‖₁ / (T·‖τ_MTL‖₁) (κ = 1 is the paper: 1/T for Task Arithmetic)"),
     density(), scope()),
    prepare=_prepare,
    peak_memory="one parameter's T deltas (prepare streams the model for the L1 norms and, with base='ties', "
                "scope='model', twice more for the streaming threshold; both are memoised per base/density/scope)",
    reference="Wang et al., LiNeS: Post-training layer scaling prevents forgetting and enhances model merging, "
              "ICLR 2025 (arXiv 2410.17146)")
