"""Merging methods: one registry, declared knobs and needs, one engine.

    from analysis.merging import METHODS, merge, MergeInputs
    result = merge(tvs, "tsv_m", rank_fraction=0.125, alpha=1.0)   # MergeResult: {param: merged delta}
    inputs = MergeInputs(tvs, evaluator)                            # data-aware methods need the evaluator
    result = merge(inputs, "regmean", n_examples=256)
    state_dict = tvs.apply(result.for_task("task_a"))               # base + the delta task_a is scored with

`merge(source, name, *, evaluator=None, cache=None, device=None, polar="auto", topk="auto", sink=None, **knobs)`:
- `source` is a TaskVectorSet or a `MergeInputs` (which carries the lazily
  computed, content-keyed resources: spectra, activation Grams, Fishers, the
  evaluator's data). A bare set gets a default MergeInputs kept on it, so
  repeated calls reuse everything; `cache` (a SpectralCache) and `evaluator`
  are folded into it.
- knobs are validated against the method's declaration
  (`METHODS[name].hyperparameters`); a missing knob takes its default, an
  unknown or out-of-range one raises `HyperparameterError` naming it.
- what a method needs (`METHODS[name].needs`: task count, spectra, labelled
  data, activations, gradients) is checked by `unavailable(name, n_tasks,
  has_data)`, the one check every page, the report and the demo table use.
- The result is a `MergeResult` on `device` (default: the inputs' device),
  float32, one tensor per name in `tvs.param_names`. As a mapping it is the
  merged delta; `for_task(task)` is what task `task` is scored with (per-task
  methods such as TSV-C give each task its own).
- `sink(name, delta)`: tensors go there as they are made (a file, the CPU)
  and nothing is returned.
- `polar` picks the solver of the polar factor (`analysis.merging.polar`):
  "auto" (Newton–Schulz on CUDA, float64 Gram eigh elsewhere), "exact" (SVD),
  "gram", "newton_schulz"; all agree within 1e-5 relative (tests).
- `topk` picks how Iso-CTS takes the top singular triplets of each projected
  residual after a change of c: "exact" (LAPACK: a full eigh / SVD, or on a
  CPU only the top k by MRRR where that pays), "subspace" (matmul-only
  subspace iteration, `analysis.svd.top_k_eigh`, exact fallback) or "auto"
  ("subspace" on CUDA, "exact" elsewhere: `analysis.merging.iso`'s Speed
  section); they agree within 1e-4 relative (tests).

Adding a method: its own module with a `MergeMethod(...)`, plus one line in
`_REGISTRY` below.
"""
from __future__ import annotations

from analysis.errors import HyperparameterError
from analysis.merging.adamerging import ADAMERGING
from analysis.merging.base import Hyperparameter, MergeContext, MergeMethod, Needs
from analysis.merging.basic import TASK_ARITHMETIC, WEIGHT_AVERAGING
from analysis.merging.breadcrumbs import BREADCRUMBS
from analysis.merging.cart import CART
from analysis.merging.consensus import CONSENSUS
from analysis.merging.dare import DARE
from analysis.merging.della import DELLA
from analysis.merging.emr import EMR
from analysis.merging.fisher import FISHER
from analysis.merging.engine import MergeResult, MergeStopped, ParamGroup, run
from analysis.merging.epimer import EPIMER
from analysis.merging.inputs import MergeInputs, as_inputs
from analysis.merging.iso import ISO_C, ISO_CTS
from analysis.merging.karcher import KARCHER
from analysis.merging.knots import KNOTS
from analysis.merging.lines import LINES
from analysis.merging.model_stock import MODEL_STOCK
from analysis.merging.regmean import REGMEAN, REGMEAN_PP
from analysis.merging.slerp import SLERP
from analysis.merging.ties import TIES
from analysis.merging.tsv import TSV_C, TSV_M
from analysis.merging.wudi import WUDI

_REGISTRY = (
    WEIGHT_AVERAGING,
    TASK_ARITHMETIC,
    TIES,
    LINES,
    DARE,
    DELLA,
    BREADCRUMBS,
    CONSENSUS,
    TSV_M,
    TSV_C,
    ISO_C,
    ISO_CTS,
    SLERP,
    KARCHER,
    MODEL_STOCK,
    FISHER,
    REGMEAN,
    REGMEAN_PP,
    EPIMER,
    CART,
    WUDI,
    ADAMERGING,
    EMR,
    KNOTS,
)
METHODS: dict[str, MergeMethod] = {m.name: m for m in _REGISTRY}

POLAR_SOLVERS = ("auto", "exact", "gram", "newton_schulz")
TOPK_SOLVERS = ("auto", "exact", "subspace")

__all__ = ["METHODS", "merge", "get_method", "unavailable", "available_methods", "MergeMethod", "MergeResult",
           "MergeInputs", "Hyperparameter", "Needs", "POLAR_SOLVERS", "TOPK_SOLVERS", "MergeContext", "ParamGroup", "MergeStopped"]


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise HyperparameterError(f"unknown merging method {name!r}; expected one of {sorted(METHODS)}") from None


def unavailable(name: str, n_tasks: int, has_data: bool) -> str | None:
    """Why method `name` cannot run on a workspace with `n_tasks` tasks (and
    labelled data or not); None when it can. The one availability check."""
    return get_method(name).unavailable(n_tasks, has_data)


def available_methods(n_tasks: int, has_data: bool) -> list[str]:
    return [name for name in METHODS if unavailable(name, n_tasks, has_data) is None]


def merge(source, method: str, *, evaluator=None, cache=None, device=None, polar: str = "auto", topk: str = "auto",
          sink=None, stop=None, **hyperparams):
    """The merged delta(s) of `source` by `method` with the given knobs (see the module docstring)."""
    spec = get_method(method)
    inputs = as_inputs(source, evaluator=evaluator, cache=cache, device=device)
    params = spec.validate(hyperparams, len(inputs.tasks))
    if polar not in POLAR_SOLVERS:
        raise HyperparameterError(f"{method}: polar solver {polar!r} is not one of {list(POLAR_SOLVERS)}")
    if topk not in TOPK_SOLVERS:
        raise HyperparameterError(f"{method}: top-k solver {topk!r} is not one of {list(TOPK_SOLVERS)}")
    return run(spec, inputs, params, polar=polar, topk=topk, sink=sink, stop=stop)
