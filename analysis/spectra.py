"""Per-layer SVD of every task matrix, computed once and cached on disk.

First version: exact thin SVD per shape group (float32, on the chosen
device), cached in a safetensors file keyed by the task vectors' content
hash. A rank-fraction change only re-slices these factors.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from analysis.device import get_device
from analysis.taskvectors import TaskVectorSet, as_matrix, atomic_save_safetensors


def default_cache_dir() -> Path:
    return Path(os.environ.get("MERGESCOPE_CACHE", Path.home() / ".cache" / "mergescope"))


class SpectralCache:
    """SVD factors (U, S, Vh) of every task's delta for each matrix parameter."""

    def __init__(self, tvs: TaskVectorSet, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None, include_embeddings: bool = False, persist: bool = True):
        self.tvs = tvs
        self.device = get_device(device)
        kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
        self.names = tvs.names_of_kind(*kinds)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "spectra"
        self.persist = persist
        self.compute_count = 0
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    @property
    def key(self) -> str:
        return self.tvs.fingerprint(self.names)

    @property
    def path(self) -> Path:
        return self.cache_dir / f"svd-{self.key}.safetensors"

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U (T,m,k), S (T,k), Vh (T,k,n)), k = min(m, n), S descending."""
        return self._all()[name]

    def _all(self):
        if self._factors is None:
            self._factors = self._load() if self.persist else None
            if self._factors is None:
                self._factors = self._compute()
                if self.persist:
                    self._save(self._factors)
        return self._factors

    def _compute(self):
        out = {}
        for name in self.names:
            stack = torch.stack([as_matrix(d) for d in self.tvs.deltas(name)]).to(self.device, torch.float32)
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            self.compute_count += 1
            out[name] = (u, s, vh)
        return out

    def _load(self):
        if not self.path.is_file():
            return None
        flat = load_file(str(self.path), device=str(self.device))
        out = {}
        for name in self.names:
            try:
                out[name] = (flat[f"U::{name}"], flat[f"S::{name}"], flat[f"Vh::{name}"])
            except KeyError:
                return None
        return out

    def _save(self, factors) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        flat = {}
        for name, (u, s, vh) in factors.items():
            flat[f"U::{name}"] = u.contiguous().cpu()
            flat[f"S::{name}"] = s.contiguous().cpu()
            flat[f"Vh::{name}"] = vh.contiguous().cpu()
        atomic_save_safetensors(flat, self.path, {"tasks": ",".join(self.tvs.tasks)})
