"""KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the
KnOTS", arXiv 2410.19735): align the task updates in one shared basis, merge
there with an existing method, map back.

Per matrix parameter (torch layout (out, in); conv kernels as out × in·k):
the task updates are concatenated column-wise and decomposed once,
    [ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]      (out × T·in),
so ΔW_t = U (Σ V_tᵀ): every task is a set of coordinates C_t = Σ V_tᵀ = Uᵀ ΔW_t
(r × in) in the shared orthonormal basis U. The inner method merges the
aligned C_t into C, and the merged update is α-scaled U C.
Following the official code (`s_on_V: True`), the inner method sees Σ V_tᵀ,
i.e. V scaled by the singular values; its TIES trims over the whole model
(all layers' coordinates at once), keeps 20 %, elects signs by the sum of
values and takes the disjoint mean: our `ties` with `scope="model"`,
`density=0.2`. DARE-TIES drops (and rescales) coordinates before TIES.

U comes from the eigendecomposition of Σ_t ΔW_t ΔW_tᵀ (out × out, float64),
which has the same left singular vectors and Σ² as eigenvalues; directions
with σ below σ_1·max(out, T·in)·ε_float32 are dropped (the official code
drops σ ≤ 1e-5 absolute). So r = the numerical rank of the concatenation,
at most min(out, T·in): for a LoRA set (rank-q adapters) r ≤ T·q, for full
fine-tuning U is usually square and the coordinates are a rotation of the
updates. A LoRA adapter is loaded as its dense update B·A
(`analysis.checkpoints.LoraAdapter`), so KnOTS runs on any set, LoRA or not.

Parameters that are not matrices (biases, norms; embeddings unless
`include_embeddings`) enter the inner method as they are (identity basis);
their magnitudes take part in the model-wide TIES threshold. The official
code leaves them out of the merge unless `merge_other_params`, and appends
a layer's bias to its weight as an extra column; we do neither.

Exactness (tests): U has orthonormal columns spanning every ΔW_t's columns,
so U Uᵀ ΔW_t = ΔW_t; with a linear inner method (task arithmetic, weight
averaging) KnOTS equals that method on the raw task vectors, and with one
task it returns the task vector (α = 1).
"""
from __future__ import annotations

import torch

from analysis.merging.base import Hyperparameter, MergeMethod, alpha, include_embeddings
from analysis.merging.common import decomposed
from analysis.merging.dare import drop_and_rescale
from analysis.merging.ties import density, disjoint_merge, memo_thresholds, model_thresholds, scope, topk_thresholds
from analysis.taskvectors import as_matrix

INNER = ("ties", "dare_ties", "task_arithmetic", "weight_averaging")
EPS32 = torch.finfo(torch.float32).eps


def shared_basis(taus: torch.Tensor) -> torch.Tensor:
    """(T, out, in) task updates -> U (out, r): the left singular vectors of
    [τ_1 … τ_T] with numerically non-zero singular values, in descending order."""
    t = taus.double()
    concat = t.permute(1, 0, 2).reshape(t.shape[1], -1)      # M = [τ_1 … τ_T]  (out, T·in)
    gram = concat @ concat.mT                                 # M Mᵀ = Σ_t τ_t τ_tᵀ
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma = evals.clamp_min(0).sqrt()
    tol = float(sigma[0]) * max(t.shape[1], t.shape[0] * t.shape[2]) * EPS32
    return evecs[:, sigma > tol].to(taus.dtype) if float(sigma[0]) > 0 else evecs[:, :0].to(taus.dtype)


def _basis(ctx, name: str) -> torch.Tensor:
    key = ("knots_basis", name, str(ctx.device))
    if key not in ctx.memo:
        ctx.memo[key] = shared_basis(as_matrix_stack(ctx.inputs.deltas(name)))
    return ctx.memo[key]


def as_matrix_stack(taus: torch.Tensor) -> torch.Tensor:
    return taus.reshape(taus.shape[0], taus.shape[1], -1)


def _aligned(ctx, params, name: str, covered: set) -> torch.Tensor:
    """The inner method's input for one parameter: Uᵀτ_t (T, r, in) for covered
    matrices, the raw deltas otherwise; dropped and rescaled for DARE-TIES."""
    taus = ctx.inputs.deltas(name)
    coords = _basis(ctx, name).mT @ as_matrix_stack(taus) if name in covered else taus
    if params["inner"] == "dare_ties":
        coords = drop_and_rescale(coords, params["drop_rate"], params["seed"], name)
    return coords


def _prepare(inputs, params, ctx):
    covered = set(decomposed(inputs.tvs, params))
    thresholds = None
    if params["inner"] in ("ties", "dare_ties") and params["scope"] == "model":
        config = ("knots_thresholds", params["inner"], params["density"], params["drop_rate"], params["seed"],
                  params["include_embeddings"])
        thresholds = memo_thresholds(ctx, config, lambda: model_thresholds(
            lambda n: _aligned(ctx, params, n, covered), list(inputs.tvs.param_names), len(inputs.tasks),
            params["density"]))
    return covered, thresholds


def inner_merge(coords: torch.Tensor, params, thresholds) -> torch.Tensor:
    """(T, ...) aligned coordinates -> α × the inner method's merge."""
    inner, a = params["inner"], params["alpha"]
    if coords[0].numel() == 0:            # an all-zero layer: its basis is empty
        return coords.sum(0)
    if inner == "task_arithmetic":
        return a * coords.sum(0)
    if inner == "weight_averaging":
        return a * coords.mean(0)
    thr = thresholds if thresholds is not None else topk_thresholds(coords.reshape(coords.shape[0], -1).abs(),
                                                                     params["density"])
    return a * disjoint_merge(coords, thr)


def _knots(group, params, ctx):
    covered, thresholds = ctx.state
    out = {}
    for name in group.names:
        merged = inner_merge(_aligned(ctx, params, name, covered), params, thresholds)
        if name in covered:
            merged = _basis(ctx, name) @ merged
        out[name] = merged.reshape(group.shape(name))
    return out


KNOTS = MergeMethod(
    "knots", "merge in the shared SVD basis of the concatenated task updates (TIES there by default), map back",
    _knots,
    (Hyperparameter("inner", "choice", "ties", help="the merge applied to the aligned coordinates "
                    "(the paper: TIES, DARE-TIES)", choices=INNER),
     density(), scope(),
     Hyperparameter("drop_rate", "float", 0.5, 0.0, 0.99, 0.01, "inner=dare_ties: probability p of dropping "
                    "each coordinate (kept ones × 1/(1−p))"),
     Hyperparameter("seed", "int", 0, 0, 2 ** 31 - 1, 1, "inner=dare_ties: random seed of the drop masks"),
     alpha(1.0), include_embeddings()),
    prepare=_prepare,
    peak_memory="one parameter's T deltas and aligned coordinates, plus the shared bases U (out × r per matrix, "
                "up to the model's matrices' size) kept in the inputs' memo; scope='model' with TIES streams the "
                "aligned coordinates twice for the threshold before the merge",
    reference="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025 (arXiv 2410.19735)")
