"""WUDI-merging (Cheng et al., ICML 2025, "Whoever started the interference
should end it: guiding data-free model merging via task vectors",
arXiv 2503.08099).

A linear layer's task vector spans (approximately) the subspace of the
layer's inputs in that task, so the task vectors stand in for the data: per
linear weight (out, in), as torch stores it, y = x Wᵀ, the merged τ_m minimises

    L(τ_m) = Σ_t (1/‖τ_t‖²_F) · ‖(τ_m − τ_t) τ_tᵀ‖²_F,

the interference on inputs x = the rows of τ_t (in-dimensional vectors).
This is RegMean's objective with the Gram G_t = τ_tᵀτ_t / ‖τ_t‖²_F in place of
the activation Gram, so its minimisers solve τ_m G = Σ_t τ_t G_t, G = Σ_t G_t.

`solver="closed_form"` (default) returns τ_m = (Σ_t τ_t G_t) G⁺ (float64,
pseudo-inverse through an eigendecomposition of G that drops eigenvalues
below λ_max·(max(out, in)·ε_float32)²: the float32 inputs' noise floor).
This is exact: it is the global minimiser of L, and when G is singular (the
task vectors' rows span less than the input space, e.g. LoRA sets) it is the
minimiser with no component outside that span, which is also the limit of
gradient descent started from the paper's initialisation Σ_t τ_t (whose rows
lie in the span, and L's gradient never leaves it).

`solver="adam"` is the paper's procedure: τ_m initialised to Σ_t τ_t, then
`steps` Adam steps (default 300, lr 1e-5, as the paper and FusionBench) on L.
Adam moves an entry by at most about lr per step (≈ 3e-3 in all), so it
reaches the minimiser only where the task vectors' entries are of that
order or smaller, as fine-tuning deltas usually are (`benchmarks/parity_b.py`,
ViT-B/32-shaped deltas with entries ~1e-3: 97–100 % of the way from the sum
to the exact minimiser, at 4–11× its time); with larger entries it stops
between Task Arithmetic (λ = 1) and the minimiser, which has the scale of an
average (equal task vectors give that vector, not T times it). `alpha`
(1 = the paper) scales either.

Other parameters: matrices only (embeddings with `include_embeddings`, as
FusionBench, which applies it to every 2-D tensor); conv kernels, biases,
norms and embeddings otherwise get the average (α × mean), as the paper.

Known answers (tests): equal task vectors give that vector; task vectors on
disjoint input columns give their sum (each task's rows are only seen by its
own G_t).
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha, include_embeddings
from analysis.merging.common import scaled, unscaled_slot

EPS32 = torch.finfo(torch.float32).eps


def normal_equations(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, R) = (Σ_t G_t, Σ_t τ_t G_t) with G_t = τ_tᵀτ_t / ‖τ_t‖²_F (0 for a zero τ_t), float64,
    one task at a time (in² + out·in floats held)."""
    gram = rhs = 0.0
    for tau in taus.double():
        w = 1.0 / float(tau.pow(2).sum()) if bool(tau.any()) else 0.0
        g_t = w * (tau.mT @ tau)
        # τ_t G_t through the smaller inner product
        r_t = tau @ g_t if tau.shape[1] <= tau.shape[0] else w * ((tau @ tau.mT) @ tau)
        gram, rhs = gram + g_t, rhs + r_t
    return gram, rhs


def wudi_closed_form(taus: torch.Tensor) -> torch.Tensor:
    """(T, out, in) task matrices -> the minimum-norm minimiser (Σ τ_t G_t) G⁺, float32."""
    gram, rhs = normal_equations(taus)
    evals, evecs = torch.linalg.eigh(gram)               # G symmetric PSD
    floor = float(evals.max().clamp_min(0)) * (max(taus.shape[1:]) * EPS32) ** 2
    keep = evals > floor
    inv = torch.where(keep, 1.0 / evals.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(evals))
    return (((rhs @ evecs) * inv) @ evecs.mT).to(taus.dtype)


def wudi_loss(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F (the paper's objective)."""
    norms = taus.pow(2).sum((1, 2))
    return (((merged[None] - taus) @ taus.mT).pow(2).sum((1, 2)) / norms).sum()


def wudi_adam(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The paper's procedure: Adam on `wudi_loss` from τ_m = Σ_t τ_t.

    The gradient is the loss's own, 2(τ_m G − Σ_t τ_t G_t), from the Grams
    computed once (one out × in × in product per step instead of autograd
    through T products)."""
    gram, rhs = (x.to(taus.dtype) for x in normal_equations(taus))
    merged = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        merged.grad = 2 * (merged.detach() @ gram - rhs)
        opt.step()
    return merged.detach()


def _covers(tvs, params):
    kinds = ("matrix", "embedding") if params["include_embeddings"] else ("matrix",)
    return tvs.names_of_kind(*kinds)


def _wudi(group, params, ctx):
    solver = params["solver"]
    config = (solver, params["steps"], params["lr"]) if solver == "adam" else (solver,)
    slot = unscaled_slot(ctx, "wudi", config)
    out = {}
    for name in group.names:
        if name not in slot:
            taus = group.deltas(name)
            slot[name] = (wudi_closed_form(taus) if solver == "closed_form"
                          else wudi_adam(taus, params["steps"], params["lr"]))
        out[name] = scaled(params["alpha"], slot[name])
    return out


WUDI = MergeMethod(
    "wudi", "per linear layer, the merge least disturbing each task's own task-vector subspace (data-free)", _wudi,
    (Hyperparameter("solver", "choice", "closed_form", help="closed_form: the exact minimiser (least squares); "
                    "adam: the paper's 300 Adam steps from the sum of the task vectors",
                    choices=("closed_form", "adam")),
     Hyperparameter("steps", "int", 300, 1, 5000, 10, "solver=adam: number of Adam steps (the paper: 300)"),
     Hyperparameter("lr", "float", 1e-5, 1e-6, 1e-3, 1e-6, "solver=adam: Adam learning rate (the paper: 1e-5)"),
     alpha(1.0), include_embeddings()),
    covers=_covers,
    peak_memory="one linear layer's T deltas and its solve, plus the unscaled merge of every linear layer (kept "
                "in the inputs' memo so an α change is a multiply)",
    reference="Cheng et al., Whoever started the interference should end it: guiding data-free model merging "
              "via task vectors (WUDI-merging), ICML 2025 (arXiv 2503.08099)")
