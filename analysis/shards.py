"""Sharded safetensors written tensor by tensor, in the `transformers` layout.

`ShardWriter(folder, max_shard_size)` takes tensors one at a time (`add`)
and writes a shard as soon as the next tensor would not fit, so at most one
shard is held (safetensors >= 0.6 writes from the tensors' own memory, no
serialised copy). `finish()` names the shards `model-0000k-of-0000N.safetensors`
and writes `model.safetensors.index.json` ({"metadata": {"total_size"},
"weight_map": {tensor: shard}}), or a single `model.safetensors` without an
index when everything fits in one shard, which is what `save_pretrained` and
`huggingface_hub.split_torch_state_dict_into_shards` do. Packing follows them
too: a tensor that would push the open shard past the limit starts a new
one; a tensor larger than the limit gets a shard of its own.

The default limit is 5GB (huggingface_hub's default and transformers 4.x's;
transformers 5 raised `save_pretrained`'s to 50GB). Sizes are bytes, or
strings with KB/MB/GB/TB (powers of 1000, as huggingface_hub reads them) or
KiB/MiB/GiB/TiB (powers of 1024).

Every file goes through `analysis.atomic` (complete or absent); that the
folder as a whole is old or new is the caller's part (`atomic_folder`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from analysis.atomic import atomic_save_safetensors, atomic_write_json
from analysis.errors import ValidationError

DEFAULT_MAX_SHARD_SIZE = "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Bytes of a shard-size setting: an int, or e.g. "5GB", "200MB", "64KiB"; ValidationError otherwise."""
    if isinstance(size, bool):
        raise ValidationError(f"max shard size must be a number of bytes or a size such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(str(size))
        unit = (m.group(2) or "B").upper() if m else ""
        if m is None or unit not in _UNITS:
            raise ValidationError(f"max shard size {size!r} is not a size: expected bytes or a number with one of "
                                  f"KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValidationError(f"max shard size must be positive, got {size!r}")
    return value


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Tensors in, shards out (module doc). `peak_bytes`: the most tensor bytes it ever held at once."""

    def __init__(self, folder: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.limit = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.weight_map: dict[str, int] = {}     # name -> shard number (1-based)
        self.dtypes: dict[str, torch.dtype] = {}
        self.total_size = 0
        self.peak_bytes = 0
        self._open: dict[str, torch.Tensor] = {}
        self._open_bytes = 0
        self._shards = 0
        self._finished = False

    @property
    def names(self) -> list[str]:
        return list(self.weight_map) + list(self._open)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self._open

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (written as it is: dtype kept, moved to the CPU)."""
        if self._finished:
            raise ValidationError(f"{self.folder}: the shards are finished; {name!r} came too late")
        if name in self:
            raise ValidationError(f"tensor {name!r} was given twice to the shard writer of {self.folder}")
        t = tensor.detach().to("cpu")
        if not t.is_contiguous() or t.untyped_storage().nbytes() != tensor_bytes(t) or t.data_ptr() in {
                v.data_ptr() for v in self._open.values()}:
            t = t.contiguous().clone()   # a view or a shared storage: safetensors writes only whole, unshared ones
        size = tensor_bytes(t)
        self.dtypes[name] = t.dtype
        self.total_size += size
        if size > self.limit:            # larger than a shard: alone in its own
            self.peak_bytes = max(self.peak_bytes, self._open_bytes + size)
            self._write({name: t})
            return
        if self._open and self._open_bytes + size > self.limit:
            self._flush()
        self._open[name] = t
        self._open_bytes += size
        self.peak_bytes = max(self.peak_bytes, self._open_bytes)

    def _flush(self) -> None:
        if self._open:
            shard, self._open, self._open_bytes = self._open, {}, 0
            self._write(shard)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        self._shards += 1
        atomic_save_safetensors(tensors, self.folder / self._provisional(self._shards), self.metadata)
        for name in tensors:
            self.weight_map[name] = self._shards

    def _provisional(self, k: int) -> str:
        return f"model-{k:05d}.safetensors"   # renamed in finish(), once the number of shards is known

    def finish(self) -> list[str]:
        """Write what is open, name the shards, write the index; returns the weight files' names."""
        if self._finished:
            raise ValidationError(f"{self.folder}: finish() was called twice")
        self._flush()
        self._finished = True
        n = self._shards
        if n == 0:
            raise ValidationError(f"{self.folder}: no tensors were given, so there is no model to write")
        if n == 1:
            (self.folder / self._provisional(1)).rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        names = {k: f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)}
        for k, final in names.items():
            (self.folder / self._provisional(k)).rename(self.folder / final)
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {name: names[k] for name, k in sorted(self.weight_map.items())}}
        atomic_write_json(self.folder / INDEX_FILE, index, indent=2, sort_keys=True)
        return [*names.values(), INDEX_FILE]

