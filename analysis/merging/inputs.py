"""MergeInputs: everything a merging method may read, behind one object.

    inputs = MergeInputs(tvs, evaluator)          # evaluator: optional (data-aware methods need it)
    merge(inputs, "regmean", n_examples=256)      # statistics computed once, cached by content
    merge(inputs, "tsv_m", rank_fraction=0.1)     # spectra computed once, cached by content

Resources are lazy: nothing is computed until a method asks for it, and each
is computed once per object (and, where persisted, once per content on disk):
- `spectra(include_embeddings)`: the SpectralCache (per-task SVD factors;
  `spectra_keep` picks how many directions it keeps, `analysis.spectra`);
- `activation_grams(n, ...)`: per-task input Gram matrices of every linear layer;
- `fisher(n, ...)`: per-task diagonal empirical Fisher;
- `evaluator`: the data API (batches, forward passes with hooks, gradients).
Callers never build caches themselves; the pages keep one MergeInputs per
workspace. `memo` holds per-object results a method wants to reuse across
knob changes (SVDs of task sums, the last unscaled merge).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.taskvectors import TaskVectorSet

Progress = Callable[[int, int, str], None]


class MergeInputs:
    def __init__(self, tvs: TaskVectorSet, evaluator=None, *, device=None, cache_dir: str | Path | None = None,
                 persist: bool = True, spectral_cache=None, progress: Progress | None = None,
                 spectra_keep: str | float | None = None):
        if not isinstance(tvs, TaskVectorSet):
            raise ValidationError(f"MergeInputs needs a TaskVectorSet, got {type(tvs).__name__}")
        self.tvs = tvs
        self.evaluator = evaluator
        if device is not None:
            self.device = get_device(device)
        elif spectral_cache is not None:
            self.device = spectral_cache.device
        else:
            self.device = get_device()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.persist = persist
        self.progress = progress
        self.spectra_keep = spectra_keep    # SpectralCache's `keep` (None: $MERGESCOPE_SPECTRA_KEEP, else "auto")
        self.memo: dict = {}
        # one merge at a time per inputs: the memo is shared by every session on a workspace and by the
        # Merge page's background merges of neighbouring knob values (ui/speculate.py)
        self.merge_lock = threading.RLock()
        self._waiting, self._waiting_guard = 0, threading.Lock()
        self._spectra: dict[bool, object] = {}
        if spectral_cache is not None:
            self._spectra[len(spectral_cache.names) > len(tvs.names_of_kind("matrix", "conv"))] = spectral_cache
        self._stats = None

    def waiting(self) -> int:
        """How many merges that cannot be stopped (someone asked for them) are waiting for or holding
        `merge_lock`: a background merge of a neighbouring knob value stops for them."""
        return self._waiting

    @contextmanager
    def wait_for_merge(self):
        with self._waiting_guard:
            self._waiting += 1
        try:
            yield
        finally:
            with self._waiting_guard:
                self._waiting -= 1

    def _report(self, done: int, total: int, what: str) -> None:
        if self.progress is not None:   # looked up per call: a page sets it around one merge
            self.progress(done, total, what)

    # ------------------------------------------------------------ identity
    @property
    def tasks(self) -> list[str]:
        return self.tvs.tasks

    @property
    def has_data(self) -> bool:
        """An evaluator that scores every task of the set (so statistics exist for all)."""
        ev = self.evaluator
        return ev is not None and all(t in ev.tasks for t in self.tvs.tasks)

    # ------------------------------------------------------------ task vectors
    def deltas(self, name: str) -> torch.Tensor:
        """(T, *shape) float32 deltas of one parameter on the device."""
        return self.tvs.deltas(name).to(self.device, torch.float32)

    def task_mean(self, name: str) -> torch.Tensor:
        """Mean over tasks of one parameter's deltas, on the device (the vector rule's α × mean, before α).
        Kept in the memo when the set is resident (one model's worth in all, beside the T kept), so a knob
        change does not average the embeddings again; a streaming set computes it per call. Do not modify
        the result in place."""
        return self._kept("task_mean", name, lambda d: d.mean(0))

    def task_sum(self, name: str) -> torch.Tensor:
        """Sum over tasks of one parameter's deltas, on the device (task arithmetic's α × sum, before α),
        kept as `task_mean` is: an α move then reads one model's worth instead of all T task vectors."""
        return self._kept("task_sum", name, lambda d: d.sum(0))

    def _kept(self, kind: str, name: str, reduce) -> torch.Tensor:
        if not self.tvs.is_resident:
            return reduce(self.deltas(name))
        key = (kind, name, str(self.device))
        if key not in self.memo:
            self.memo[key] = reduce(self.deltas(name))
        return self.memo[key]

    # ------------------------------------------------------------ spectra
    def spectra(self, include_embeddings: bool = False):
        """The SpectralCache of this set (built on first use; factors computed on first read)."""
        key = bool(include_embeddings)
        if key not in self._spectra and self._spectra:
            # a cache given by the caller serves either way: names it lacks
            # (embeddings) are decomposed on demand by the method
            return next(iter(self._spectra.values()))
        if key not in self._spectra:
            from analysis.spectra import SpectralCache
            cache_dir = self.cache_dir / "spectra" if self.cache_dir is not None else None
            self._spectra[key] = SpectralCache(self.tvs, device=self.device, cache_dir=cache_dir,
                                               include_embeddings=key, persist=self.persist,
                                               progress=self._report,   # looked up per call, like statistics
                                               keep=self.spectra_keep)
        return self._spectra[key]

    # ------------------------------------------------------------ data statistics
    def require_data(self, method: str) -> None:
        if not self.has_data:
            have = [] if self.evaluator is None else list(self.evaluator.tasks)
            missing = [t for t in self.tvs.tasks if t not in have]
            raise ValidationError(f"{method} needs labelled data for every task; no data for {missing}"
                                  + ("" if self.evaluator is not None else " (no evaluator given)"))

    @property
    def statistics(self):
        """The StatisticsCache (per-task Grams and Fishers, content-keyed on disk)."""
        if self._stats is None:
            from analysis.statistics import StatisticsCache
            self.require_data("data statistics")
            cache_dir = self.cache_dir / "statistics" if self.cache_dir is not None else None
            self._stats = StatisticsCache(self.tvs, self.evaluator, self.device, cache_dir=cache_dir,
                                          persist=self.persist, progress=self._report)
        return self._stats

    def activation_grams(self, n: int = 256, split: str = "train", seed: int = 0):
        """{task: {weight name: Σ x xᵀ}} plus `rows::name` counts (analysis.statistics)."""
        return self.statistics.activation_grams(n=n, split=split, seed=seed)

    def fisher(self, n: int = 256, split: str = "train", seed: int = 0):
        """{task: {name: diagonal empirical Fisher}} (analysis.statistics)."""
        return self.statistics.fisher_diagonals(n=n, split=split, seed=seed)

    @property
    def stats_compute_count(self) -> int:
        return 0 if self._stats is None else self._stats.compute_count


def as_inputs(source, *, evaluator=None, cache=None, device=None) -> MergeInputs:
    """A MergeInputs for `source` (a MergeInputs is returned as is).

    A bare TaskVectorSet gets one default MergeInputs, kept on the set (and one
    per SpectralCache passed as `cache`), so repeated `merge(tvs, ...)` calls
    reuse spectra, statistics and memos. The default keeps its spectra in
    memory only (persist=False): a plain `merge(tvs, ...)` writes no files."""
    if isinstance(source, MergeInputs):
        if evaluator is not None and source.evaluator is None:
            source.evaluator = evaluator
        return source
    if not isinstance(source, TaskVectorSet):
        raise ValidationError(f"merge needs a TaskVectorSet or MergeInputs, got {type(source).__name__}")
    holder, attr = (cache, "_merge_inputs") if cache is not None else (source, "_default_merge_inputs")
    inputs = getattr(holder, attr, None)
    dev = get_device(device) if device is not None else None
    if inputs is None or inputs.tvs is not source or (dev is not None and inputs.device != dev):
        inputs = MergeInputs(source, evaluator, device=dev, persist=False, spectral_cache=cache)
        setattr(holder, attr, inputs)
    if evaluator is not None and inputs.evaluator is not evaluator:
        inputs.evaluator, inputs._stats = evaluator, None
    return inputs
