"""RegMean (Jin et al., ICLR 2023) and RegMean++ (Nguyen et al., 2025).

RegMean, per linear layer y = x Wᵀ: the merged W minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²,
X_t the layer's inputs in task t's fine-tuned model. With G_t = X_tᵀX_t,
    W* = (Σ_t W_t G_t)(Σ_t G_t)⁻¹   ⇒   δ* = (Σ_t τ_t G_t)(Σ_t G_t)⁻¹   (θ₀ cancels).
The paper's off-diagonal shrinkage: each G_t becomes α·G_t + (1−α)·diag(G_t)
(knob `off_diagonal`, default 0.9 as in the paper); α = 1 is the exact
least-squares merge, α = 0 a per-input-feature weighted average. Every other
parameter (biases, norms, embeddings) is averaged, as in the paper.
G_t are raw sums over the first n training examples of every task (all
non-padding tokens), as in the paper; every task uses the same n.
Equal Grams give exactly the average; a linear-regression problem gives the
joint least-squares solution (tests). If Σ_t G_t is singular (an input feature
no task ever activates), the pseudo-inverse is used.

RegMean++: the same solve, but G_t^(l) comes from the *merged* model's
activations: block by block in depth order, block l's Grams are computed
with blocks < l (and the embeddings) already merged, and task t's own
weights from block l on. Our choice where the paper leaves room: within a
block, the layers see task t's own block (so the attention output projection
is fed by task t's attention, as in RegMean); linear layers outside the
numbered blocks (a pooler) come last, with every block merged. The
statistics depend on the knobs (they are recomputed per configuration and
memoised per MergeInputs), T × (blocks + 1) forward sweeps of n examples.

`alpha` scales the merged delta (1 = the papers) for a fair comparison with
Task Arithmetic; RegMean++ feeds deeper blocks with the α-scaled merge.
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha
from analysis.merging.common import unscaled_slot
from analysis.merging.fisher import n_examples


def shrink(grams: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G) over a batch of Grams (…, d, d)."""
    if off_diagonal == 1.0:
        return grams
    diag = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))
    return off_diagonal * grams + (1.0 - off_diagonal) * diag


def regmean_solve(taus: torch.Tensor, grams: torch.Tensor, off_diagonal: float = 1.0) -> torch.Tensor:
    """(T, out, in) deltas, (T, in, in) Grams -> (Σ_t τ_t G_t)(Σ_t G_t)⁻¹, float64 inside."""
    g = shrink(grams.double(), off_diagonal)
    num = (taus.double() @ g).sum(0)               # (out, in)
    den = g.sum(0)                                 # (in, in), symmetric
    try:
        sol = torch.linalg.solve(den, num.mT).mT
        if not torch.isfinite(sol).all():
            raise torch.linalg.LinAlgError("non-finite solve")
    except torch.linalg.LinAlgError:
        sol = num @ torch.linalg.pinv(den, hermitian=True)
    return sol.to(taus.dtype)


def _grams(inputs, params, ctx):
    return inputs.activation_grams(n=params["n_examples"])


def _solve_or_average(taus: torch.Tensor, grams: list | None, params) -> torch.Tensor:
    """RegMean for a 2-D linear weight with Grams, the average for anything else; × α."""
    if grams is None or taus.ndim != 3:   # RegMean solves 2-D linear weights only
        return params["alpha"] * taus.mean(0)
    stacked = torch.stack(grams).to(taus.device)
    return params["alpha"] * regmean_solve(taus, stacked, params["off_diagonal"])


def _regmean(group, params, ctx):
    stats, tasks = ctx.state, ctx.inputs.tasks
    return {name: _solve_or_average(group.deltas(name),
                                    [stats[t][name] for t in tasks] if name in stats[tasks[0]] else None, params)
            for name in group.names}


def _regmean_pp_merge(inputs, params, ctx) -> dict:
    """The whole RegMean++ merge, block by block (see the module docstring)."""
    slot = unscaled_slot(ctx, "regmean_pp", tuple(sorted(params.items())))   # α-scaled: α feeds deeper blocks
    if slot:
        return slot
    merged: dict[str, torch.Tensor] = {}   # filled block by block; memoised only when complete
    tvs, ev, tasks = inputs.tvs, inputs.evaluator, inputs.tasks
    linear = {n for n in inputs.activation_grams(n=params["n_examples"])[tasks[0]] if not n.startswith("rows::")}
    depths = sorted({tvs.depth(n) for n in tvs.param_names if tvs.depth(n) is not None})
    stages = depths + [None]
    # parameters no block owns and no Gram needs (embeddings, final norms) are averaged first
    for name in tvs.param_names:
        if tvs.depth(name) is None and name not in linear:
            merged[name] = params["alpha"] * inputs.deltas(name).mean(0)
    base = {n: tvs.base_tensor(n).to(ctx.device, torch.float32) for n in tvs.param_names}
    total, done = len(stages) * len(tasks), 0
    for stage in stages:
        names = [n for n in tvs.param_names if tvs.depth(n) == stage and n not in merged]
        wanted = [n for n in names if n in linear]
        grams = {n: [] for n in wanted}
        for ti, task in enumerate(tasks):
            if wanted:
                point = {n: base[n] + (merged[n] if n in merged else inputs.deltas(n)[ti]) for n in tvs.param_names}
                g, _rows = ev.linear_input_grams(task, "train", n=params["n_examples"], seed=0, params=point,
                                                 names=wanted)
                for n in wanted:
                    grams[n].append(g[n].double())
            done += 1
            inputs._report(done, total, f"RegMean++ block {stage if stage is not None else 'rest'}: {task}")
        for name in names:
            merged[name] = _solve_or_average(inputs.deltas(name), grams.get(name), params)
    slot.update(merged)
    return slot


def _regmean_pp(group, params, ctx):
    return {name: ctx.state[name] for name in group.names}


def off_diagonal() -> Hyperparameter:
    return Hyperparameter("off_diagonal", "float", 0.9, 0.0, 1.0, 0.05,
                          "RegMean's α: off-diagonal Gram entries scaled by α (1 = exact least squares, 0 = diagonal)")


REGMEAN = MergeMethod(
    "regmean", "per linear layer, the least-squares merge of the tasks' outputs on their own inputs", _regmean,
    (n_examples(), off_diagonal(), alpha(1.0)),
    needs=Needs(labelled_data=True, activations=True), prepare=_grams,
    peak_memory="every task's input Gram of every linear layer (T × Σ d_in², float64, on the CPU)",
    reference="Jin et al., Dataless knowledge fusion by merging weights of language models (RegMean), ICLR 2023")

REGMEAN_PP = MergeMethod(
    "regmean_pp", "RegMean with Grams from the merged model's own activations, block by block", _regmean_pp,
    (n_examples(), off_diagonal(), alpha(1.0)),
    needs=Needs(labelled_data=True, activations=True), prepare=_regmean_pp_merge,
    peak_memory="the whole merged delta (built block by block in prepare) plus one block's Grams",
    reference="Nguyen et al., RegMean++: enhancing effectiveness and generalization of regression mean "
              "for model merging, 2025")
