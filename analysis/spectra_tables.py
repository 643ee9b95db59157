"""Spectra tables from a SpectralCache's factors: singular values, energy kept
at a rank fraction, effective rank, TSV-C compression error and accuracy.

Tidy DataFrames (columns param, depth, kind, module, task, …), so the same
table feeds a plot, a CSV export and a test. Only the factors are read: a
rank-fraction change never recomputes an SVD.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import pandas as pd
import torch

from analysis.errors import ValidationError
from analysis.svd import low_rank, truncation_rank
from analysis.taskvectors import _BLOCK, module_of, as_matrix  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from analysis.spectra import SpectralCache

Progress = Callable[[int, int, str], None]
def _meta_cols(cache: "SpectralCache", name: str) -> dict:
    return cache.tvs.layer_meta(name)


def _names(cache: "SpectralCache", names: Iterable[str] | None) -> list[str]:
    return list(cache.names if names is None else names)


def singular_values_table(cache: "SpectralCache", names: Iterable[str] | None = None,
                          first_look: bool = False) -> pd.DataFrame:
    """param, depth, kind, module, task, index (0-based), rank_fraction ((index+1)/k), sigma.

    `first_look`: the values of `cache.first_look` (these layers alone, without computing the cache)."""
    frames = []
    values = cache.first_look if first_look else cache.singular_values
    for name in _names(cache, names):
        s = values(name)
        t, k = s.shape
        df = pd.DataFrame({"task": [task for task in cache.tasks for _ in range(k)],
                           "index": list(range(k)) * t,
                           "rank_fraction": [(i + 1) / k for i in range(k)] * t,
                           "sigma": s.reshape(-1).double().numpy()})
        for col, val in reversed(list(_meta_cols(cache, name).items())):
            df.insert(0, col, val)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else _empty(["task", "index", "rank_fraction", "sigma"])


def _empty(cols: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=["param", "depth", "kind", "module", *cols])


def energy_table(cache: "SpectralCache", rank_fractions: Sequence[float], names: Iterable[str] | None = None) -> pd.DataFrame:
    """Energy (squared Frobenius norm) kept by the top ⌊f·k⌋ singular values:
    Σ_{i<r} σ_i² / Σ_i σ_i². Columns: param, depth, kind, module, task,
    rank_fraction, rank, energy. Also TSV-C's relative error: rel_error =
    ‖A − A_r‖_F / ‖A‖_F = sqrt(1 − energy) (Eckart–Young), from the spectrum."""
    frames = []
    for name in _names(cache, names):   # one array operation per parameter (the page asks for 100 fractions)
        s2 = cache.singular_values(name).double().cpu() ** 2
        t, k = s2.shape
        csum = s2.cumsum(1)
        total = csum[:, -1:]                                         # so that the full rank keeps exactly 1.0
        ranks = torch.tensor([truncation_rank(k, f) for f in rank_fractions], dtype=torch.long)
        kept = csum[:, ranks - 1]                                    # (T, F)
        ok = total > 0
        energy = torch.where(ok, kept / total.clamp_min(1e-300), torch.ones_like(kept)).clamp_max(1.0)
        err = torch.where(ok, ((total - kept).clamp_min(0.0) / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(kept))
        n_f = len(ranks)
        df = pd.DataFrame({"task": list(cache.tasks) * n_f,                      # rows: fraction-major, then task
                           "rank_fraction": [float(f) for f in rank_fractions for _ in range(t)],
                           "rank": ranks.repeat_interleave(t).numpy(),
                           "energy": energy.mT.reshape(-1).numpy(), "rel_error": err.mT.reshape(-1).numpy()})
        for col, val in reversed(list(_meta_cols(cache, name).items())):
            df.insert(0, col, val)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else _empty(["task", "rank_fraction", "rank", "energy",
                                                                        "rel_error"])


def tsvc_error_table(cache: "SpectralCache", rank_fraction: float, names: Iterable[str] | None = None) -> pd.DataFrame:
    """TSV-C: relative Frobenius error of each task matrix truncated to rank
    fraction f, plus the share of the matrix's numbers kept r(m+n+1)/(mn)."""
    df = energy_table(cache, [rank_fraction], names)
    if df.empty:
        return df.assign(storage=[])
    shapes = {n: as_matrix(torch.empty(cache.tvs.shape(n), device="meta")).shape for n in df["param"].unique()}
    df["storage"] = [r * (shapes[p][0] + shapes[p][1] + 1) / (shapes[p][0] * shapes[p][1])
                     for p, r in zip(df["param"], df["rank"])]
    return df.drop(columns=["energy"])


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007): exp(H(p)), p_i = σ_i / Σ_j σ_j,
    H the Shannon entropy (natural log, 0·log 0 = 0). Over the last dim."""
    s = s.double().clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp_min(1e-300), torch.zeros_like(s))
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    return h.exp()


def effective_rank_table(cache: "SpectralCache", names: Iterable[str] | None = None) -> pd.DataFrame:
    """param, depth, kind, module, task, k, effective_rank, effective_rank_fraction (= erank / k)."""
    rows = []
    for name in _names(cache, names):
        s = cache.singular_values(name)
        er = effective_rank(s)
        meta = _meta_cols(cache, name)
        k = s.shape[1]
        for ti, task in enumerate(cache.tasks):
            rows.append({**meta, "task": task, "k": k, "effective_rank": float(er[ti]),
                         "effective_rank_fraction": float(er[ti]) / k})
    return pd.DataFrame(rows) if rows else _empty(["task", "k", "effective_rank", "effective_rank_fraction"])


def tsvc_delta(cache: "SpectralCache", task: str, rank_fraction: float) -> dict[str, torch.Tensor]:
    """TSV-C compressed task vector: each cached matrix replaced by its rank
    ⌊f·k⌋ truncation (reshaped back for conv kernels); parameters outside the
    cache (biases, norms, embeddings when excluded) are kept whole: they are
    a small part of the model and TSV compresses matrices only."""
    if task not in cache.tasks:
        raise ValidationError(f"no task named {task!r}; tasks are {cache.tasks}")
    ti = cache.tasks.index(task)
    covered = set(cache.names)
    out = {}
    for name in cache.tvs.param_names:
        if name in covered:
            (u, s, vh), r = cache.truncated(name, rank_fraction)
            out[name] = low_rank(u[ti], s[ti], vh[ti], r).reshape(cache.tvs.shape(name)).cpu()
        else:
            out[name] = cache.tvs.delta(task, name)
    return out


def tsvc_accuracy_table(cache: "SpectralCache", evaluator, rank_fractions: Sequence[float], split: str = "test",
                        subsample: int | None = None, tasks: Sequence[str] | None = None,
                        include_full: bool = True, progress: Progress | None = None) -> pd.DataFrame:
    """Each task's own model with its task vector TSV-C-compressed at each rank
    fraction, scored on its own task by `evaluator.evaluate_delta` (contract in
    analysis.evaluation). `include_full` adds rank_fraction 1.0 (uncompressed
    task vector) as the reference. Columns: task, rank_fraction, metric,
    value, split, n."""
    tasks = list(tasks or [t for t in cache.tasks if t in set(evaluator.tasks)])
    missing = [t for t in tasks if t not in cache.tasks]
    if missing:
        raise ValidationError(f"no task named {missing[0]!r} in the set; tasks are {cache.tasks}")
    fractions = sorted({float(f) for f in rank_fractions} | ({1.0} if include_full else set()), reverse=True)
    frames, done, total = [], 0, len(tasks) * len(fractions)
    for task in tasks:
        for f in fractions:
            delta = tsvc_delta(cache, task, f) if f < 1.0 else cache.tvs.task_vector(task)
            df = evaluator.evaluate_delta(delta, alpha=1.0, split=split, subsample=subsample, tasks=[task])
            df = df[df["task"] == task].copy()
            df.insert(1, "rank_fraction", f)
            frames.append(df)
            done += 1
            if progress is not None:
                progress(done, total, f"{task} @ {f:g}")
    return pd.concat(frames, ignore_index=True)
