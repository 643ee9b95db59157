"""Merging methods: one registry, declared knobs, merged deltas.

    from analysis.merging import METHODS, merge
    delta = merge(tvs, "tsv_m", rank_fraction=0.125, alpha=1.0)   # {param: merged delta}
    state_dict = tvs.apply(delta)                                 # base + delta

`merge(tvs, name, cache=None, device=None, polar="auto", **knobs)`:
- knobs are validated against the method's declaration
  (`METHODS[name].hyperparameters`); a missing knob takes its default, an
  unknown or out-of-range one raises `HyperparameterError` naming it.
- SVD methods (`uses_spectra`: tsv_m, tsv_c, iso_c, iso_cts) read per-task
  factors from `cache` (an `analysis.spectra.SpectralCache`); pass the same
  cache across calls and a change of rank fraction or α never recomputes a
  per-task SVD (`cache.compute_count` stays put). The SVD of the task sum
  (Iso) and the last unscaled merge are memoised per cache too. With
  `cache=None` a non-persistent cache is built for this call.
- The result lives on `device` (default: the cache's device, else
  `analysis.device.get_device()`), float32, one tensor per name in
  `tvs.param_names`, each of the parameter's shape.
- `tsv_c` returns one delta per task: `{task: {param: delta}}`.
- `polar` picks the solver of the polar factor (`analysis.merging.polar`):
  "auto" (Newton–Schulz on CUDA, float64 Gram eigh elsewhere), "exact" (SVD),
  "gram", "newton_schulz"; all agree within 1e-5 relative (tests).
"""
from __future__ import annotations

import weakref
from typing import Any

from analysis.device import get_device
from analysis.errors import HyperparameterError
from analysis.merging.base import Hyperparameter, MergeContext, MergeMethod
from analysis.merging.basic import TASK_ARITHMETIC, WEIGHT_AVERAGING
from analysis.merging.consensus import CONSENSUS
from analysis.merging.dare import DARE
from analysis.merging.iso import ISO_C, ISO_CTS
from analysis.merging.slerp import SLERP
from analysis.merging.ties import TIES
from analysis.merging.tsv import TSV_C, TSV_M

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    WEIGHT_AVERAGING, TASK_ARITHMETIC, TIES, DARE, CONSENSUS, TSV_M, TSV_C, ISO_C, ISO_CTS, SLERP)}

POLAR_SOLVERS = ("auto", "exact", "gram", "newton_schulz")

# memo per SpectralCache object (sum SVDs, last unscaled merge); dies with the cache
_MEMOS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

__all__ = ["METHODS", "merge", "get_method", "MergeMethod", "Hyperparameter", "POLAR_SOLVERS"]


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise HyperparameterError(f"unknown merging method {name!r}; expected one of {sorted(METHODS)}") from None


def merge(tvs, method: str, *, cache=None, device=None, polar: str = "auto", **hyperparams):
    """The merged delta of `tvs` by `method` with the given knobs (see the module docstring)."""
    spec = get_method(method)
    params = spec.validate(hyperparams, len(tvs.tasks))
    if polar not in POLAR_SOLVERS:
        raise HyperparameterError(f"{method}: polar solver {polar!r} is not one of {list(POLAR_SOLVERS)}")
    if spec.uses_spectra and cache is None:
        from analysis.spectra import SpectralCache
        cache = SpectralCache(tvs, device=device, persist=False,
                              include_embeddings=bool(params.get("include_embeddings", False)))
    if device is not None:
        dev = get_device(device)
    elif cache is not None:
        dev = cache.device
    else:
        dev = get_device()
    memo = _MEMOS.setdefault(cache, {}) if cache is not None else {}
    ctx = MergeContext(device=dev, cache=cache, polar=polar, memo=memo)
    return spec.fn(tvs, params, ctx)
