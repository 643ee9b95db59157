"""EpiMer: merging as a curvature-weighted Fréchet mean in the task vectors' subspace.

Seed paper: "Model Merging on Loss Landscape: A Geometry Perspective". The
merged point is the Fréchet mean of the fine-tuned models under a Riemannian
metric, the expected Hessian, approximated by a curvature estimate H_t per
task, and the computation is restricted to a low-rank subspace spanned by the
task vectors. Everything below is per parameter tensor ("layer"), flattened
to D entries in row-major order.

The maths, as implemented (each choice where the paper leaves room is named):

- **Subspace** (knob `rank`): an orthonormal basis B (D, k).
  `rank = 0` (default): the span of the layer's T task vectors, k ≤ T.
  `rank = r > 0`: the top-r singular directions of each task's matrix, each
  rank-one uᵢvᵢᵀ flattened is one generator (T·r of them; conv kernels are
  read as (out, in·kh·kw) matrices; factors come from the set's
  SpectralCache, so they are computed once per set). Generators are
  orthonormalised by a thin QR followed by an SVD of the small R factor (a
  rank-revealing QR): directions with σ ≤ 1e-10·σ_max are dropped, so
  parallel or zero task vectors never enter B.
- **Metric** (knob `metric`), H_t for task t at its fine-tuned model:
  `fisher` (default): the diagonal empirical Fisher, `inputs.fisher(n)`,
  raw (not normalised per task: the objective is the summed loss Σ_t L_t).
  `kfac_input`: for linear weights W (out, in), H_t = I_out ⊗ Ḡ_t acting as
  W ↦ W Ḡ_t, Ḡ_t = G_t / rows_t the mean input second moment (G_t = Σ x xᵀ
  from `inputs.activation_grams(n)`, rows_t the tokens counted): K-FAC with
  the output-gradient factor set to I. Every other tensor (conv kernels,
  biases, norms, embeddings) falls back to the identity metric.
  `identity`: H_t = I; needs no statistics (diagnostics, tests).
- **Solve** (closed form): c_t = Bᵀτ_t, A_t = BᵀH_tB, b_t = BᵀH_tτ_t,
      c* = (Σ_t A_t)⁻¹ Σ_t b_t,
  the exact minimiser over the subspace of the quadratic model
  L(θ) = ½ Σ_t (θ − τ_t)ᵀ H_t (θ − τ_t). No ridge: Σ_t A_t is
  eigen-decomposed; in directions where it vanishes (eigenvalue ≤
  1e-10·largest: no task has curvature there) c* takes the flat mean's
  coordinates c̄ = mean_t c_t. This is the limit of a vanishing floor εI
  added to every H_t (b has no component there), and it keeps the
  "no information ⇒ plain average" rule of Fisher merging.
- **Scale**: the paper's object is a *mean*; the merged delta is
      δ = α · T · B c*,  α default 0.3,
  so that with the identity metric and the task-vector subspace EpiMer is
  exactly Task Arithmetic α·Σ_t τ_t (Σ_t τ_t lies in the span, and c* = c̄).
- **Tensors outside the subspace solve**: only matrices and conv kernels get
  a subspace; 1-D tensors (biases, norms) and embeddings get the full-space
  Fréchet mean under a diagonal metric, α·T·(Σ_t F_t ⊙ τ_t / Σ_t F_t) with
  the Fisher metric (entries no task is sensitive to, Σ_t F_t ≤ 1e-10·max,
  get the plain mean), and α·T·mean_t τ_t = α·Σ_t τ_t otherwise
  (identity, or kfac_input, which has no statistic for them).

Diagnostics (`epimer_diagnostics`, one row per subspace layer and
diagnostic; they describe the Fréchet mean itself, before α·T):
- `frechet_variance` V = Σ_t (c* − c_t)ᵀ A_t (c* − c_t) (0 when all τ_t are
  equal and lie in the subspace, as they always do for rank 0; in a subspace
  that misses them, c* also answers the coupling BᵀH_t r_t, so V = 0 there
  only for the identity metric);
- `residual_energy` R = Σ_t r_tᵀ H_t r_t, r_t = τ_t − B c_t (the part of
  each task vector outside the subspace);
- `quadratic_loss` L(Bc*) ≤ V + R (the two terms of the error bound:
  Bc* − τ_t = B(c* − c_t) − r_t and (x − y)ᵀH(x − y) ≤ 2xᵀHx + 2yᵀHy);
- `heterogeneity`: the dispersion of the trace-normalised projected metrics,
  √(mean_t ‖Â_t − mean Â‖²_F) / ‖mean Â‖_F with Â_t = A_t / tr A_t: 0 when
  every H_t is a multiple of one H (then curvature only reweights tasks),
  large where the tasks' curvatures point in different directions;
- `flat_departure` ‖c* − c̄‖_Ā / ‖c̄‖_Ā (Ā = mean_t A_t): how far the
  curvature-aware mean moves from the flat subspace mean (0 for equal metrics);
- `predicted_gain` (L(Bc̄) − L(Bc*)) / L(Bc̄) ≥ 0: the share of the
  quadratic model's loss that curvature-awareness removes in this layer;
- `ta_departure` ‖δ_EpiMer − δ_TA‖ / ‖δ_TA‖ at the same α (α cancels).

Memory: per layer the T deltas, the T metrics (diagonal: T·D floats; K-FAC:
T·in² floats), B (D·k) and one H_t·B (D·k), float64 (float32 on MPS); the
prepare pass holds every task's statistic for the whole model on the CPU.
Time: O(T·D·k²) per layer for a diagonal metric, O(T·k·out·in²) for K-FAC.
Measured on one CPU thread, float64, T = 8, one 3072×768 layer: basis 0.5 s,
Fisher solve 2.2 s (diagnostics +1 s), K-FAC solve 13.6 s, Fisher solve at
rank 2 (k ≤ 16) 11 s. An α change reuses the memoised unscaled merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import pandas as pd
import torch

from analysis.errors import ValidationError
from analysis.merging.base import Hyperparameter, MergeMethod, Needs, alpha
from analysis.merging.common import scaled, unscaled_slot
from analysis.spectra import thin_svd

METRICS = ("fisher", "kfac_input", "identity")
SUBSPACE_KINDS = ("matrix", "conv")
RANK_TOL = 1e-10        # relative: basis directions and null directions of Σ A_t below this are dropped
DIAGNOSTICS = ("frechet_variance", "residual_energy", "quadratic_loss", "heterogeneity", "flat_departure",
               "predicted_gain", "ta_departure")
META_COLUMNS = ["param", "depth", "kind", "module"]
DIAGNOSTIC_COLUMNS = META_COLUMNS + ["curvature", "k", "metric", "value"]
MASS_COLUMNS = META_COLUMNS + ["task", "mass", "share"]

# H_t as one of: None (identity), a (T, D) tensor of diagonals, or a callable (t, X) -> H_t X.
Metric = Union[None, torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor]]


# ============================================================ pure maths (no model, no data)
def apply_metric(metric: Metric, t: int, x: torch.Tensor) -> torch.Tensor:
    """H_t x for x of shape (D,) or (D, j)."""
    if metric is None:
        return x
    if isinstance(metric, torch.Tensor):
        h = metric[t]
        return h * x if x.ndim == 1 else h[:, None] * x
    return metric(t, x)


def kfac_input_metric(grams: torch.Tensor, shape: Sequence[int]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """H_t = I_out ⊗ G_t on row-major flattened (out, in) matrices, i.e. W ↦ W G_t.

    `grams`: (T, in, in) symmetric positive semi-definite."""
    m, n = int(shape[0]), int(shape[1])
    if grams.ndim != 3 or tuple(grams.shape[1:]) != (n, n):
        raise ValidationError(f"K-FAC input metric: expected Grams of shape (T, {n}, {n}) for a ({m}, {n}) "
                              f"weight, got {tuple(grams.shape)}")

    def times(t: int, x: torch.Tensor) -> torch.Tensor:
        g = grams[t]
        if x.ndim == 1:
            return (x.reshape(m, n) @ g).reshape(-1)
        j = x.shape[1]
        return (x.T.reshape(j, m, n) @ g).reshape(j, m * n).T
    return times


def orthonormal_basis(generators: torch.Tensor, tol: float = RANK_TOL) -> torch.Tensor:
    """(D, j) generators -> (D, k) orthonormal basis of their span, k ≤ j.

    Thin QR, then the SVD of the small R (a rank-revealing QR): directions
    with singular value ≤ tol·σ_max are dropped."""
    d, j = generators.shape
    if j == 0:
        return generators.new_zeros(d, 0)
    q, r = torch.linalg.qr(generators)
    u, s, _ = torch.linalg.svd(r)
    if not bool(s[0] > 0):
        return generators.new_zeros(d, 0)
    return q @ u[:, s > tol * s[0]]


def subspace_basis(taus: torch.Tensor, rank: int = 0, shape: Sequence[int] | None = None,
                   factors: tuple | None = None, tol: float = RANK_TOL) -> torch.Tensor:
    """Orthonormal basis B (D, k) of the EpiMer subspace of one layer.

    `taus`: (T, D) flattened task vectors. `rank = 0`: the span of the task
    vectors. `rank = r > 0`: the span of every task's top-r rank-one
    singular directions uᵢvᵢᵀ of its (m, n) matrix (`shape`; conv kernels as
    (out, in·k)); `factors` = (U (T,m,≥r), S (T,≥r), Vh (T,≥r,n)) if already
    computed (the SpectralCache), else a thin SVD here."""
    n_tasks, d = taus.shape
    if rank == 0:
        return orthonormal_basis(taus.T, tol)
    if shape is None or len(shape) < 2:
        raise ValidationError(f"EpiMer rank={rank}: singular directions need a matrix shape, got {shape}")
    m, n = int(shape[0]), int(d // int(shape[0]))
    if factors is None:
        factors = thin_svd(taus.reshape(n_tasks, m, n))
    u, s, vh = (f.to(taus.device, taus.dtype) for f in factors)
    r = min(int(rank), s.shape[-1])
    u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    top = s.max() if s.numel() else s.new_zeros(())
    if not bool(top > 0):
        return taus.new_zeros(d, 0)
    keep = (s > tol * top).reshape(-1)                           # (T·r,): a zero matrix has no directions
    gens = (u.transpose(1, 2)[..., :, None] * vh[..., None, :])  # (T, r, m, n): uᵢ vᵢᵀ, unit Frobenius norm
    gens = gens.reshape(n_tasks * r, d)[keep]
    return orthonormal_basis(gens.T, tol)


@dataclass
class LayerSolution:
    """One layer's EpiMer solve in subspace coordinates (all small: k = B's width)."""

    coords: torch.Tensor     # (T, k) c_t = Bᵀ τ_t
    grams: torch.Tensor      # (T, k, k) A_t = Bᵀ H_t B
    rhs: torch.Tensor        # (T, k) b_t = Bᵀ H_t τ_t
    c_star: torch.Tensor     # (k,) the curvature-aware Fréchet mean
    c_flat: torch.Tensor     # (k,) the flat subspace mean, mean_t c_t

    @property
    def k(self) -> int:
        return int(self.coords.shape[1])


def solve_coordinates(a_sum: torch.Tensor, b_sum: torch.Tensor, c_flat: torch.Tensor,
                      tol: float = RANK_TOL) -> torch.Tensor:
    """c* = (Σ A_t)⁻¹ Σ b_t; where Σ A_t vanishes (eigenvalue ≤ tol·largest), c̄'s coordinates."""
    if a_sum.shape[0] == 0:
        return c_flat.clone()
    evals, evecs = torch.linalg.eigh(0.5 * (a_sum + a_sum.T))
    top = evals.max()
    if not bool(top > 0):
        return c_flat.clone()
    keep = evals > tol * top
    coeff = torch.where(keep, (evecs.T @ b_sum) / torch.where(keep, evals, torch.ones_like(evals)),
                        evecs.T @ c_flat)
    return evecs @ coeff


def solve_layer(taus: torch.Tensor, basis: torch.Tensor, metric: Metric = None, tol: float = RANK_TOL) -> LayerSolution:
    """The EpiMer solve of one layer: (T, D) task vectors, (D, k) orthonormal basis, metrics H_t."""
    n_tasks, k = taus.shape[0], basis.shape[1]
    coords = taus @ basis
    grams = taus.new_zeros(n_tasks, k, k)
    rhs = taus.new_zeros(n_tasks, k)
    for t in range(n_tasks):
        hb = apply_metric(metric, t, basis)                    # (D, k)
        a = basis.T @ hb
        grams[t] = 0.5 * (a + a.T)
        rhs[t] = hb.T @ taus[t]
    c_flat = coords.mean(0)
    c_star = solve_coordinates(grams.sum(0), rhs.sum(0), c_flat, tol)
    return LayerSolution(coords, grams, rhs, c_star, c_flat)


def epimer_point(taus: torch.Tensor, basis: torch.Tensor, metric: Metric = None) -> torch.Tensor:
    """B c*: the curvature-aware Fréchet mean of one layer (mean scale, (D,))."""
    return basis @ solve_layer(taus, basis, metric).c_star


def vector_rule(taus: torch.Tensor, diagonal: torch.Tensor | None = None, tol: float = RANK_TOL) -> torch.Tensor:
    """Full-space Fréchet mean under a diagonal metric: Σ_t h_t ⊙ τ_t / Σ_t h_t per entry (plain mean
    where Σ_t h_t ≤ tol·max, and everywhere when `diagonal` is None). (T, D) -> (D,)."""
    mean = taus.mean(0)
    if diagonal is None:
        return mean
    total = diagonal.sum(0)
    top = total.max() if total.numel() else total.new_zeros(())
    if not bool(top > 0):
        return mean
    ok = total > tol * top
    weighted = (diagonal * taus).sum(0) / torch.where(ok, total, torch.ones_like(total))
    return torch.where(ok, weighted, mean)


def quadratic_loss(sol: LayerSolution, residuals: torch.Tensor, c: torch.Tensor) -> float:
    """L(Bc) = ½ Σ_t (Bc − τ_t)ᵀ H_t (Bc − τ_t) from the small quantities:
    Bc − τ_t = B(c − c_t) − r_t and Bᵀ H_t r_t = b_t − A_t c_t; `residuals` = (T,) r_tᵀ H_t r_t."""
    e = c[None, :] - sol.coords                                   # (T, k)
    quad = torch.einsum("ti,tij,tj->t", e, sol.grams, e)
    cross = (e * (sol.rhs - torch.einsum("tij,tj->ti", sol.grams, sol.coords))).sum(1)
    return float(0.5 * (quad - 2.0 * cross + residuals).sum())


def _a_norm(a: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.sqrt(torch.clamp(x @ a @ x, min=0.0)))


def metric_dispersion(grams: torch.Tensor, tol: float = RANK_TOL) -> float:
    """√(mean_t ‖Â_t − mean Â‖²_F) / ‖mean Â‖_F, Â_t = A_t / tr A_t (tasks with tr A_t > tol·max only).

    0 when every projected metric is a multiple of one matrix; NaN when no task has curvature."""
    if grams.shape[-1] == 0:
        return float("nan")
    traces = torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1)
    top = traces.max()
    if not bool(top > 0):
        return float("nan")
    used = grams[traces > tol * top] / traces[traces > tol * top][:, None, None]
    mean = used.mean(0)
    spread = ((used - mean) ** 2).sum((1, 2)).mean().sqrt()
    return float(spread / torch.linalg.matrix_norm(mean))


def layer_diagnostics(taus: torch.Tensor, basis: torch.Tensor, metric: Metric = None,
                      sol: LayerSolution | None = None) -> dict[str, float]:
    """The EpiMer diagnostics of one layer (module doc): {name: value} in DIAGNOSTICS order."""
    sol = sol if sol is not None else solve_layer(taus, basis, metric)
    n_tasks = taus.shape[0]
    residuals = taus.new_zeros(n_tasks)
    for t in range(n_tasks):
        r = taus[t] - basis @ sol.coords[t]
        residuals[t] = r @ apply_metric(metric, t, r)
    e = sol.c_star[None, :] - sol.coords
    variance = float(torch.einsum("ti,tij,tj->t", e, sol.grams, e).sum())
    a_mean = sol.grams.mean(0)
    flat_norm = _a_norm(a_mean, sol.c_flat)
    loss_star = quadratic_loss(sol, residuals, sol.c_star)
    loss_flat = quadratic_loss(sol, residuals, sol.c_flat)
    ta = taus.sum(0)
    ta_norm = float(torch.linalg.vector_norm(ta))
    departure = float(torch.linalg.vector_norm(n_tasks * (basis @ sol.c_star) - ta))
    return {
        "frechet_variance": variance,
        "residual_energy": float(residuals.sum()),
        "quadratic_loss": loss_star,
        "heterogeneity": metric_dispersion(sol.grams),
        "flat_departure": _a_norm(a_mean, sol.c_star - sol.c_flat) / flat_norm if flat_norm > 0 else float("nan"),
        "predicted_gain": max(0.0, (loss_flat - loss_star) / loss_flat) if loss_flat > 0 else 0.0,
        "ta_departure": departure / ta_norm if ta_norm > 0 else float("nan"),
    }


# ============================================================ statistics -> per-layer metrics
def work_dtype(device) -> torch.dtype:
    """float64 for the solve (float32 on MPS, which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def load_statistics(inputs, metric: str, n_examples: int):
    """The statistic `metric` needs, from the inputs' content-keyed cache (None for identity).

    An evaluator without the data API (`fisher_diagonal`, `linear_input_grams`)
    is reported as a ValidationError naming what is missing, not a crash."""
    if metric not in METRICS:
        raise ValidationError(f"EpiMer metric must be one of {list(METRICS)}, got {metric!r}")
    if metric == "identity":
        return None
    inputs.require_data(f"epimer (metric={metric!r})")
    try:
        if metric == "fisher":
            return inputs.fisher(n=n_examples)
        return inputs.activation_grams(n=n_examples)
    except AttributeError as exc:
        what = "a diagonal Fisher" if metric == "fisher" else "activation Grams"
        raise ValidationError(f"epimer (metric={metric!r}) needs {what} from the evaluator's data API, which "
                              f"{type(inputs.evaluator).__name__} lacks ({exc}); metric='identity' needs no "
                              "data") from exc


def layer_metric(stats, metric: str, name: str, tasks: Sequence[str], shape: Sequence[int], device,
                 dtype) -> tuple[Metric, str]:
    """(H for one parameter, the curvature actually used: 'fisher', 'kfac_input' or 'identity…')."""
    if metric == "identity" or stats is None:
        return None, "identity"
    if metric == "fisher":
        if not all(name in stats[t] for t in tasks):
            return None, "identity (no Fisher)"
        h = torch.stack([stats[t][name].to(device, dtype).reshape(-1) for t in tasks])
        return h, "fisher"
    rows_key = f"rows::{name}"
    if len(shape) != 2 or not all(name in stats[t] for t in tasks):
        return None, "identity (not a linear weight)"
    grams = []
    for t in tasks:
        rows = float(stats[t][rows_key]) if rows_key in stats[t] else 1.0
        grams.append(stats[t][name].to(device, dtype) / max(rows, 1.0))
    return kfac_input_metric(torch.stack(grams), shape), "kfac_input"


def _factors(inputs, name: str, rank: int):
    """Per-task SVD factors of one matrix, from the set's SpectralCache (computed once per set)."""
    if rank == 0:
        return None
    cache = inputs.spectra(False)
    if name in cache.names:   # only the top `rank` (a ValidationError naming K if the cache keeps fewer)
        return cache.top(name, min(int(rank), cache.rank(name)))
    return None


def _layer(inputs, stats, name: str, metric: str, rank: int):
    """(flat task vectors (T, D), basis or None, H, curvature used) of one parameter, float64 on the device."""
    tvs = inputs.tvs
    dtype = work_dtype(inputs.device)
    taus = inputs.deltas(name).to(dtype)
    shape = tuple(taus.shape[1:])
    flat = taus.reshape(taus.shape[0], -1)
    kind = tvs.kind(name)
    h, used = layer_metric(stats, metric, name, tvs.tasks, shape, flat.device, dtype)
    if kind not in SUBSPACE_KINDS:
        if not isinstance(h, torch.Tensor):      # the vector rule takes a diagonal metric or none
            h, used = None, "identity"
        return flat, None, h, used
    matrix_shape = (shape[0], flat.shape[1] // shape[0])
    basis = subspace_basis(flat, rank, matrix_shape, _factors(inputs, name, rank))
    return flat, basis, h, used


# ============================================================ the method
def n_examples_knob(default: int = 256) -> Hyperparameter:
    return Hyperparameter("n_examples", "int", default, 16, 4096, 16,
                          "examples per task used to compute the curvature statistic (a fixed, seeded subset of train)")


def _prepare(inputs, params, ctx):
    return load_statistics(inputs, params["metric"], params["n_examples"])


def _epimer(group, params, ctx):
    inputs, stats = ctx.inputs, ctx.state
    slot = unscaled_slot(ctx, "epimer", (params["metric"], params["rank"], params["n_examples"]))
    out = {}
    for name in group.names:
        if name not in slot:
            flat, basis, h, _ = _layer(inputs, stats, name, params["metric"], params["rank"])
            point = vector_rule(flat, h) if basis is None else basis @ solve_layer(flat, basis, h).c_star
            slot[name] = (flat.shape[0] * point).reshape(inputs.tvs.shape(name)).to(torch.float32)
        out[name] = scaled(params["alpha"], slot[name])
    return out


EPIMER = MergeMethod(
    "epimer", "curvature-weighted Fréchet mean of the task vectors in their own subspace (α·T × the mean)", _epimer,
    (alpha(0.3),
     Hyperparameter("metric", "choice", "fisher", choices=METRICS,
                    help="Riemannian metric H_t: diagonal Fisher, K-FAC input Gram (linear weights; identity "
                         "elsewhere), or identity (= task arithmetic in the task-vector subspace)"),
     Hyperparameter("rank", "int", 0, 0, 8, 1,
                    "subspace: 0 = span of the T task vectors; r > 0 = each task's top-r singular directions "
                    "(k ≤ T·r)"),
     n_examples_knob()),
    needs=Needs(labelled_data=True, gradients=True, activations=True),
    prepare=_prepare,
    peak_memory="the T per-task statistics of the whole model on the CPU (T × model size for the Fisher, T × Σ in² "
                "for K-FAC), plus per layer the T deltas, T metrics and the basis B (D × k) in float64; the "
                "unscaled merge is memoised (one model copy) so an α change is a multiply",
    reference="EpiMer — Model Merging on Loss Landscape: A Geometry Perspective (seed paper); closed-form "
              "Fréchet mean in the task-vector subspace, our choices in analysis/merging/epimer.py")


# ============================================================ tables for pages and tests
def _meta(tvs, name: str) -> dict:
    return tvs.layer_meta(name)


def epimer_diagnostics(inputs, metric: str = "fisher", rank: int = 0, n_examples: int = 256,
                       names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy per-layer diagnostics (module doc) of the subspace layers (matrices, conv kernels):
    columns param, depth, kind, module, curvature (the metric used there), k, metric (the
    diagnostic's name, one of DIAGNOSTICS), value."""
    if int(rank) < 0:
        raise ValidationError(f"EpiMer rank must be ≥ 0, got {rank}")
    stats = load_statistics(inputs, metric, n_examples)
    tvs = inputs.tvs
    layers = [n for n in (names or tvs.param_names) if tvs.kind(n) in SUBSPACE_KINDS]
    rows = []
    for i, name in enumerate(layers):
        flat, basis, h, used = _layer(inputs, stats, name, metric, int(rank))
        values = layer_diagnostics(flat, basis, h)
        meta = {**_meta(tvs, name), "curvature": used, "k": basis.shape[1]}
        rows += [{**meta, "metric": key, "value": value} for key, value in values.items()]
        if getattr(inputs, "progress", None) is not None:
            inputs.progress(i + 1, len(layers), f"EpiMer diagnostics: {name}")
    return pd.DataFrame(rows, columns=DIAGNOSTIC_COLUMNS)


def diagnostics_wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per layer, one column per diagnostic (in DIAGNOSTICS order)."""
    keys = META_COLUMNS + ["curvature", "k"]
    if not len(table):
        return pd.DataFrame(columns=keys + list(DIAGNOSTICS))
    wide = table.pivot_table(index="param", columns="metric", values="value", sort=False, dropna=False)
    meta = table.drop_duplicates("param").set_index("param")[keys[1:]]
    out = meta.join(wide[[c for c in DIAGNOSTICS if c in wide.columns]]).reset_index()
    return out[keys + [c for c in DIAGNOSTICS if c in out.columns]]


def fisher_mass_table(tvs, fishers: dict[str, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Per-layer Fisher mass Σ F_t of every task, and its share of the task's total (sums to 1 per task)."""
    rows = []
    for task in tvs.tasks:
        masses = {n: float(fishers[task][n].double().sum()) for n in tvs.param_names if n in fishers[task]}
        total = sum(masses.values())
        for name, mass in masses.items():
            rows.append({**_meta(tvs, name), "task": task, "mass": mass,
                         "share": mass / total if total > 0 else float("nan")})
    return pd.DataFrame(rows, columns=MASS_COLUMNS)
