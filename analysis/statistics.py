"""Per-task data statistics for the data-aware merging methods, cached on disk
by content.

- `activation_grams`: for every linear layer, Σ x xᵀ of its inputs over the
  first n examples of a task's split (padding tokens excluded), computed in
  the task's own fine-tuned model (RegMean's G_t). float64, (d_in, d_in).
- `fisher_diagonals`: the diagonal empirical Fisher of every parameter, mean
  over n examples of (∂ log p(y|x) / ∂θ)², at the task's fine-tuned model
  (Fisher merging's F_t, Matena & Raffel 2022). float32, the parameter's shape.

Both go through the Evaluator's public data API (`linear_input_grams`,
`fisher_diagonal`). The cache key is a hash of the set's content (base and
every delta), the examples used (their tensors), the split, n and the seed,
so a changed checkpoint or dataset can never be served stale statistics.
Files are written all or nothing (`analysis.atomic`); a file that cannot be
written (disk full) is logged and kept in `write_errors` as a `StorageError`
naming it, and the statistic stays in memory: hours of Fisher computation
are never thrown away because the disk is full.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open

from analysis.atomic import atomic_save_safetensors
from analysis.errors import StorageError
from analysis.paths import cache_root
from analysis.taskvectors import TaskVectorSet

Progress = Callable[[int, int, str], None]
FORMAT = "1"
_log = logging.getLogger(__name__)


def model_point(tvs: TaskVectorSet, task: str, device) -> dict[str, torch.Tensor]:
    """Backbone parameters of one task's fine-tuned model: base + τ_t."""
    return {n: (tvs.base_tensor(n).to(device, torch.float32) + tvs.delta(task, n).to(device, torch.float32))
            for n in tvs.param_names}


def set_key(tvs: TaskVectorSet) -> str:
    """Content hash of the set: every base tensor it merges and every delta."""
    h = hashlib.blake2b(digest_size=16)
    h.update(tvs.fingerprint().encode())
    for n in tvs.param_names:
        t = tvs.base_tensor(n).contiguous()
        h.update(n.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def data_key(evaluator, task: str, split: str, n: int | None, seed: int) -> str:
    """Hash of the exact examples a statistic is computed on."""
    idx = evaluator.examples(task, split, n=n, seed=seed)
    part = evaluator.data[task][split]
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([task, split, n, seed]).encode())
    for name, value in sorted(vars(part).items()):
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value[idx].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class StatisticsCache:
    """Content-keyed statistics of one set and one evaluator.

    `compute_count` counts tasks whose statistic was computed (not loaded), so
    tests can assert that a second merge recomputes nothing."""

    def __init__(self, tvs: TaskVectorSet, evaluator, device, cache_dir: str | Path | None = None,
                 persist: bool = True, progress: Progress | None = None):
        self.tvs = tvs
        self.evaluator = evaluator
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "statistics"
        self.persist = persist
        self.progress = progress
        self.compute_count = 0
        self.write_errors: list[StorageError] = []   # files that could not be written (kept in memory instead)
        self._memory: dict[tuple, dict[str, torch.Tensor]] = {}
        self._set_key: str | None = None

    def _key(self, kind: str, task: str, split: str, n: int | None, seed: int) -> str:
        if self._set_key is None:
            self._set_key = set_key(self.tvs)
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([FORMAT, kind, self._set_key, data_key(self.evaluator, task, split, n, seed)]).encode())
        return h.hexdigest()

    def _get(self, kind: str, split: str, n: int | None, seed: int, compute) -> dict[str, dict[str, torch.Tensor]]:
        """{task: {name: tensor}} for every task, from memory, disk or `compute(task)`."""
        out = {}
        tasks = self.tvs.tasks
        for i, task in enumerate(tasks):
            mem_key = (kind, task, split, n, seed)
            loaded = mem_key not in self._memory   # progress only for work done (a page redraws on every hit)
            if loaded:
                key = self._key(kind, task, split, n, seed)
                path = self.cache_dir / f"{kind}-{key}.safetensors"
                stats = _load(path) if self.persist else None
                if stats is None:
                    stats = compute(task)
                    self.compute_count += 1
                    _log.info("statistics: computed %s of task %s (%s)", kind, task, key)
                    if self.persist:
                        self._save(path, stats, {"format": FORMAT, "kind": kind, "task": task})
                self._memory[mem_key] = stats
            out[task] = self._memory[mem_key]
            if loaded and self.progress is not None:
                self.progress(i + 1, len(tasks), f"{kind}: {task}")
        return out

    def _save(self, path: Path, stats: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        try:
            atomic_save_safetensors({k: v.contiguous().cpu() for k, v in stats.items()}, path, meta)
        except StorageError as exc:
            self.write_errors.append(exc)
            _log.warning("statistics not saved (they stay in memory): %s", exc)

    def activation_grams(self, n: int = 256, split: str = "train", seed: int = 0,
                         names: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """{task: {weight name: Σ x xᵀ (d_in, d_in) float64}} at each fine-tuned model;
        also `{task: {"rows::" + name: number of rows}}` (tokens counted)."""
        def compute(task):
            grams, rows = self.evaluator.linear_input_grams(task, split, n=n, seed=seed,
                                                            params=model_point(self.tvs, task, self.device))
            out = {k: v.double().cpu() for k, v in grams.items() if k in self.tvs.param_names}
            out.update({f"rows::{k}": torch.tensor(float(rows[k]), dtype=torch.float64) for k in out})
            return out
        stats = self._get("grams", split, n, seed, compute)
        if names is not None:
            wanted = set(names)
            stats = {t: {k: v for k, v in s.items() if k.removeprefix("rows::") in wanted} for t, s in stats.items()}
        return stats

    def fisher_diagonals(self, n: int = 256, split: str = "train", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        """{task: {name: diagonal empirical Fisher}} at each fine-tuned model."""
        def compute(task):
            fisher = self.evaluator.fisher_diagonal(task, split, n=n, seed=seed,
                                                    params=model_point(self.tvs, task, self.device))
            return {k: v.float().cpu() for k, v in fisher.items() if k in self.tvs.param_names}
        return self._get("fisher", split, n, seed, compute)


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """The file's tensors, or None when missing or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
