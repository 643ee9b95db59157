"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: adaptive model merging
for multi-task learning", arXiv 2310.02575).

Task Arithmetic with learned coefficients: θ = θ₀ + Σ_t λ_t τ_t, where
- `mode="task_wise"`: one λ_t per task;
- `mode="layer_wise"`: one λ_{t,p} per task and parameter tensor p (the
  official code's "layer": every tensor of the model, biases and norms too),
learned without labels by minimising the Shannon entropy of the merged
model's predictions on unlabelled inputs, each task through its own head:

    min_λ Σ_t mean_{x ∈ batch_t} H(softmax(head_t(f(x; θ₀ + Σ_s λ_s τ_s)))).

Every step draws one batch per task (a fresh seeded random subset of
`batch_size` examples of `split` through the evaluator's public data API),
sums the tasks' mean entropies and takes one Adam step on λ, differentiating
through the merged weights (`Evaluator.logits` swaps them in with
`torch.func.functional_call`). Labels are never read.

Paper defaults, kept: λ initialised to 0.3 (`init`), Adam lr 1e-3
(betas 0.9, 0.999), batch 16 per task, λ clamped to [0, 1] in the forward
pass (`clamp`, as the official code: a clamped λ gets no gradient), the test
split's inputs (the paper's test-time adaptation; `split` may pick
validation or train instead). Deliberate difference: `steps` defaults to 100
instead of the paper's 500 so a merge on a CPU takes minutes (each step is
T forward and backward passes of a batch); set 500 for the paper's schedule.
Batches are independent seeded subsets rather than a shuffled loader's
epochs. `steps=0` is Task Arithmetic at λ = `init` (0.3 = our TA default).

The learned coefficients and the entropy after every step are kept in the
inputs' memo (one fit per knob configuration): `fit_coefficients(inputs,
**knobs)` returns them (an `AdaMergingFit`), and the merge is exactly
Σ_t λ_t τ_t with the returned (clamped) λ.

Memory: every task's delta of every parameter on the device at once
(T × the model), plus one batch per task of activations for the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.merging.base import Hyperparameter, MergeContext, MergeMethod, Needs
from analysis.merging.common import unscaled_slot
from analysis.merging.inputs import as_inputs

MODES = ("task_wise", "layer_wise")


@dataclass
class AdaMergingFit:
    """λ as used in the merge (clamped if `clamp`): (T,) task-wise or (P, T)
    layer-wise with rows in `names` order; `entropy[i]` is the summed mean
    entropy of step i's batches at λ after i updates (entropy[0]: the
    initial λ; entropy[-1]: the returned λ)."""

    coefficients: torch.Tensor
    names: list[str]
    tasks: list[str]
    mode: str
    entropy: list[float]

    def for_param(self, name: str) -> torch.Tensor:
        """(T,) coefficients of one parameter."""
        return self.coefficients if self.mode == "task_wise" else self.coefficients[self.names.index(name)]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def _coefficients(raw: torch.Tensor, clamp: bool) -> torch.Tensor:
    return raw.clamp(0.0, 1.0) if clamp else raw


def _merged_params(raw, params, names, base, taus):
    lam = _coefficients(raw, params["clamp"])
    if params["mode"] == "task_wise":
        return {n: base[n] + torch.tensordot(lam, taus[n], dims=1) for n in names}
    return {n: base[n] + torch.tensordot(lam[i], taus[n], dims=1) for i, n in enumerate(names)}


def _batch_entropy(ev, tasks, split, params, merged, step: int) -> torch.Tensor:
    """Σ_t mean entropy on task t's batch of this step (differentiable w.r.t. the merged weights)."""
    total = 0.0
    for task in tasks:
        for x, _labels, _mask in ev.batches(task, split, n=params["batch_size"], seed=params["seed"] * 1_000_003 + step,
                                            batch_size=params["batch_size"]):
            total = total + entropy(ev.logits(x, task, merged))
    return total


def _fit(inputs, params) -> AdaMergingFit:
    tvs, ev, tasks, device = inputs.tvs, inputs.evaluator, inputs.tasks, inputs.device
    names = list(tvs.param_names)
    base = {n: tvs.base_tensor(n).to(device, torch.float32) for n in names}
    taus = {n: inputs.deltas(n) for n in names}
    shape = (len(tasks),) if params["mode"] == "task_wise" else (len(names), len(tasks))
    raw = torch.full(shape, float(params["init"]), device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=params["lr"], betas=(0.9, 0.999))
    split, steps, history = params["split"], params["steps"], []
    for step in range(steps + 1):
        last = step == steps           # the last pass only records the final entropy
        with torch.set_grad_enabled(not last):
            opt.zero_grad()
            loss = _batch_entropy(ev, tasks, split, params, _merged_params(raw, params, names, base, taus), step)
            history.append(float(loss.detach()))
            if last:
                break
            loss.backward()
            opt.step()
        inputs._report(step + 1, steps, f"AdaMerging step {step + 1}/{steps}")
    lam = _coefficients(raw.detach(), params["clamp"])
    return AdaMergingFit(lam, names, list(tasks), params["mode"], history)


def fit_coefficients(source, **knobs) -> AdaMergingFit:
    """The learned λ (and entropy trace) of `merge(source, "adamerging", **knobs)`, memoised with it."""
    from analysis.merging import get_method
    inputs = as_inputs(source)
    params = get_method("adamerging").validate(knobs, len(inputs.tasks))
    inputs.require_data("adamerging")
    return _memoised_fit(inputs, params, inputs.memo)


def _memoised_fit(inputs, params, memo) -> AdaMergingFit:
    slot = unscaled_slot(MergeContext(device=inputs.device, inputs=inputs, memo=memo), "adamerging",
                         tuple(sorted(params.items())))
    if "fit" not in slot:
        slot["fit"] = _fit(inputs, params)
    return slot["fit"]


def _prepare(inputs, params, ctx):
    return _memoised_fit(inputs, params, ctx.memo)


def _adamerging(group, params, ctx):
    fit = ctx.state
    return {n: torch.tensordot(fit.for_param(n).to(ctx.device), group.deltas(n), dims=1) for n in group.names}


ADAMERGING = MergeMethod(
    "adamerging", "Task Arithmetic with per-task (or per-task-and-layer) λ learned by entropy minimisation "
    "on unlabelled inputs", _adamerging,
    (Hyperparameter("mode", "choice", "task_wise", help="one λ per task, or one per task and parameter tensor",
                    choices=MODES),
     Hyperparameter("steps", "int", 100, 0, 2000, 10, "Adam steps (the paper: 500; 100 here to keep a CPU merge "
                    "to minutes; 0 = Task Arithmetic at λ = init)"),
     Hyperparameter("lr", "float", 1e-3, 1e-4, 1e-1, 1e-4, "Adam learning rate (the paper: 1e-3)"),
     Hyperparameter("init", "float", 0.3, 0.0, 1.0, 0.05, "initial λ of every task (the paper: 0.3)"),
     Hyperparameter("clamp", "bool", True, help="clamp λ to [0, 1] in the forward pass (the official code)"),
     Hyperparameter("batch_size", "int", 16, 1, 512, 1, "unlabelled examples per task per step (the paper: 16)"),
     Hyperparameter("split", "choice", "test", help="whose inputs (never labels) the entropy is measured on "
                    "(the paper: test, as test-time adaptation)", choices=("test", "validation", "train")),
     Hyperparameter("seed", "int", 0, 0, 2 ** 31 - 1, 1, "random seed of the batches")),
    needs=Needs(labelled_data=True), prepare=_prepare,
    peak_memory="every task's delta of every parameter on the device (T × the model) plus one batch per task "
                "of activations for the backward pass",
    reference="Yang et al., AdaMerging: adaptive model merging for multi-task learning, ICLR 2024 "
              "(arXiv 2310.02575)")
