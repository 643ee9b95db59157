"""TaskVectorSet: a base model's parameters plus named task deltas, read lazily.

Per-parameter access (`delta(task, name)`) reads exactly the two tensors it
needs (fine-tuned and base), so a 7B model never needs 7B x T floats in RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import save_file

from analysis.checkpoints import (DictSource, LoraAdapter, SafetensorsSource, TensorSource,
                                  is_lora_adapter, open_checkpoint)
from analysis.errors import CheckpointError, ValidationError

KINDS = ("matrix", "conv", "embedding", "vector")
_DEPTH = re.compile(r"(?:^|\.)(?:layer|layers|blocks|resblocks|h)\.(\d+)\.")
_EMBEDDING = re.compile(r"(embed|(^|\.)(wte|wpe|shared)\.weight$)", re.IGNORECASE)
FORMAT_VERSION = 1


def parameter_kind(name: str, shape: Sequence[int]) -> str:
    """'matrix' | 'conv' | 'embedding' | 'vector' from a parameter's name and shape."""
    if len(shape) <= 1:
        return "vector"
    if len(shape) >= 3:
        return "conv"
    return "embedding" if _EMBEDDING.search(name) else "matrix"


def parameter_depth(name: str) -> int | None:
    """Block index from names like 'encoder.layer.3.', 'blocks.3.', 'h.3.'."""
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Conv kernels (out, in, *k) as (out, in * prod(k)); matrices unchanged."""
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


class TaskVector(dict):
    """A task vector as a value: name -> delta tensor, with arithmetic."""

    def _zip(self, other, op):
        if isinstance(other, TaskVector):
            if set(other) != set(self):
                raise ValidationError("task vectors hold different parameter names: "
                                      f"{sorted(set(self) ^ set(other))[:3]} ...")
            return TaskVector({k: op(v, other[k]) for k, v in self.items()})
        return NotImplemented

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # so sum() works
            return TaskVector(self)
        return self._zip(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._zip(other, torch.sub)

    def __neg__(self):
        return TaskVector({k: -v for k, v in self.items()})

    def __mul__(self, scalar: float):
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({k: v * scalar for k, v in self.items()})

    __rmul__ = __mul__

    def scale(self, alpha: float) -> "TaskVector":
        return self * alpha

    def norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.values())))


class _FullModelDeltas:
    """Deltas of a full fine-tuned checkpoint against the base."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.origin = source.origin

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.source.get(name).float() - base.float()


class _LoraDeltas:
    def __init__(self, adapter: LoraAdapter):
        self.adapter = adapter
        self.origin = str(adapter.folder)
        self.targets = set(adapter.targets())

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if name in self.targets:
            return self.adapter.delta(name)
        return torch.zeros(base.shape, dtype=torch.float32)


class _StoredDeltas:
    """Deltas saved by `TaskVectorSet.save`."""

    def __init__(self, source: TensorSource, origin: str):
        self.source = source
        self.origin = origin

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.source.get(name).float()


class TaskVectorSet:
    """Base parameters + named task deltas.

    Parameters are the base's floating tensors that every task model also
    has, minus names matching `exclude` (e.g. per-task classification heads).
    Non-floating tensors (position ids, BatchNorm counters) are buffers:
    carried by `apply` from the base and never merged.
    """

    def __init__(self, base: TensorSource, tasks: Mapping[str, object], exclude: Iterable[str] = (),
                 sources: Mapping[str, str] | None = None):
        if not tasks:
            raise ValidationError("a task-vector set needs at least one task")
        self.base = base
        self._tasks = dict(tasks)
        self.exclude = [re.compile(p) for p in exclude]
        self.sources = dict(sources or {"base": base.origin, **{t: d.origin for t, d in self._tasks.items()}})
        self.buffers = [k for k in base.keys() if not base.dtype(k).is_floating_point]
        self.excluded = [k for k in base.keys() if any(p.search(k) for p in self.exclude)]
        skip = set(self.buffers) | set(self.excluded)
        self.param_names = [k for k in base.keys() if k not in skip]
        self._fingerprints: dict[tuple, str] = {}

    # ------------------------------------------------------------ builders
    @classmethod
    def from_state_dicts(cls, base_sd: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]],
                         exclude: Iterable[str] = ()) -> "TaskVectorSet":
        base = DictSource(base_sd, origin="<base state dict>")
        tasks = {}
        for task, sd in _unique_tasks(finetuned).items():
            src = DictSource(sd, origin=f"<state dict of task {task!r}>")
            tasks[task] = _FullModelDeltas(src)
        return cls._validated(base, tasks, exclude)

    @classmethod
    def from_checkpoints(cls, base_path: str | Path, finetuned: Mapping[str, str | Path] | Sequence[tuple[str, str | Path]],
                         exclude: Iterable[str] = (), trust_pickle: bool = False) -> "TaskVectorSet":
        """Base checkpoint + {task: fine-tuned checkpoint or LoRA adapter folder}."""
        base = open_checkpoint(base_path, trust_pickle=trust_pickle)
        tasks = {}
        shapes = {k: base.shape(k) for k in base.keys()}
        for task, path in _unique_tasks(finetuned).items():
            if is_lora_adapter(path):
                tasks[task] = _LoraDeltas(LoraAdapter(path, base.keys(), shapes))
            else:
                tasks[task] = _FullModelDeltas(open_checkpoint(path, trust_pickle=trust_pickle))
        return cls._validated(base, tasks, exclude)

    @classmethod
    def from_lora(cls, base_path: str | Path, adapters: Mapping[str, str | Path], exclude: Iterable[str] = ()) -> "TaskVectorSet":
        for task, folder in _unique_tasks(adapters).items():
            if not is_lora_adapter(folder):
                raise CheckpointError(f"{folder}: task {task!r} is not a LoRA adapter folder (no adapter_config.json)")
        return cls.from_checkpoints(base_path, adapters, exclude)

    @classmethod
    def _validated(cls, base: TensorSource, tasks: dict, exclude) -> "TaskVectorSet":
        tvs = cls(base, tasks, exclude)
        for task, deltas in tasks.items():
            if isinstance(deltas, _FullModelDeltas):
                tvs._check_full_model(task, deltas.source)
        return tvs

    def _check_full_model(self, task: str, src: TensorSource) -> None:
        """Keys, shapes and dtypes from headers only: no tensor data is read."""
        base_keys = set(self.base.keys()) - set(self.excluded)
        ft_keys = {k for k in src.keys() if not any(p.search(k) for p in self.exclude)}
        missing = sorted(base_keys - ft_keys)
        extra = sorted(ft_keys - base_keys)
        if missing:
            raise ValidationError(f"{src.origin}: task {task!r} is missing {len(missing)} tensor(s) of the base "
                                  f"{self.base.origin}, e.g. {missing[:3]}")
        if extra:
            raise ValidationError(f"{src.origin}: task {task!r} has {len(extra)} tensor(s) the base "
                                  f"{self.base.origin} lacks, e.g. {extra[:3]} (pass exclude=[regex] to drop heads)")
        for name in sorted(base_keys):
            if src.shape(name) != self.base.shape(name):
                raise ValidationError(f"{src.where(name)}: tensor {name!r} of task {task!r} has shape "
                                      f"{tuple(src.shape(name))}, the base {self.base.where(name)} has {tuple(self.base.shape(name))}")
            fb, ff = self.base.dtype(name).is_floating_point, src.dtype(name).is_floating_point
            if fb != ff or (name in self.param_names and not ff):
                raise ValidationError(f"{src.where(name)}: tensor {name!r} of task {task!r} is {src.dtype(name)}, "
                                      f"the base has {self.base.dtype(name)}; task vectors need floating tensors in both")

    # ------------------------------------------------------------ access
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def kind(self, name: str) -> str:
        self._require_param(name)
        return parameter_kind(name, self.base.shape(name))

    def depth(self, name: str) -> int | None:
        return parameter_depth(name)

    def names_of_kind(self, *kinds: str) -> list[str]:
        return [n for n in self.param_names if self.kind(n) in kinds]

    def base_tensor(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        if t.dtype.is_floating_point:
            _check_finite(t, self.base.where(name), name)
        return t

    def delta(self, task: str, name: str) -> torch.Tensor:
        """Fine-tuned minus base for one parameter, in float32; reads two tensors."""
        if task not in self._tasks:
            raise ValidationError(f"no task named {task!r}; tasks are {self.tasks}")
        self._require_param(name)
        deltas = self._tasks[task]
        base = self.base_tensor(name)
        d = deltas.delta(name, base)
        where = deltas.source.where(name) if hasattr(deltas, "source") else deltas.origin
        _check_finite(d, where, name, task)
        return d

    def deltas(self, name: str, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """All tasks' deltas of one parameter stacked: (T, *shape); reads the base once."""
        tasks = list(tasks or self.tasks)
        base = self.base_tensor(name)
        out = []
        for task in tasks:
            deltas = self._tasks[task]
            d = deltas.delta(name, base)
            _check_finite(d, getattr(deltas, "origin", "?"), name, task)
            out.append(d)
        return torch.stack(out)

    def _require_param(self, name: str) -> None:
        if name in self.param_names:
            return
        if name in self.buffers:
            raise ValidationError(f"{self.base.where(name)}: tensor {name!r} is {self.base.dtype(name)}, "
                                  "not floating: it is a buffer and has no task vector")
        if name in self.excluded:
            raise ValidationError(f"tensor {name!r} is excluded from this set (exclude patterns)")
        raise ValidationError(f"{self.base.origin}: no parameter named {name!r}")

    # ------------------------------------------------------------ arithmetic
    def task_vector(self, task: str, names: Iterable[str] | None = None) -> TaskVector:
        return TaskVector({n: self.delta(task, n) for n in (names or self.param_names)})

    def sum(self, tasks: Sequence[str] | None = None, names: Iterable[str] | None = None) -> TaskVector:
        names = list(names or self.param_names)
        return TaskVector({n: self.deltas(n, tasks).sum(0) for n in names})

    def subset(self, tasks: Sequence[str]) -> "TaskVectorSet":
        unknown = [t for t in tasks if t not in self._tasks]
        if unknown:
            raise ValidationError(f"no task named {unknown[0]!r}; tasks are {self.tasks}")
        sub = TaskVectorSet(self.base, {t: self._tasks[t] for t in tasks}, [p.pattern for p in self.exclude],
                            {k: v for k, v in self.sources.items() if k == "base" or k in tasks})
        return sub

    def apply(self, delta: Mapping[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
        """Full state dict: base + alpha * delta (base dtype); other tensors from the base."""
        unknown = [k for k in delta if k not in self.param_names]
        if unknown:
            raise ValidationError(f"delta holds {unknown[0]!r}, which is not a parameter of this set")
        out = {}
        for name in self.base.keys():
            t = self.base.get(name)
            if name in delta:
                t = (t.float() + alpha * delta[name].to("cpu", torch.float32)).to(t.dtype)
            out[name] = t
        return out

    def fingerprint(self, names: Iterable[str] | None = None) -> str:
        """Content hash of the task vectors over `names` (all parameters by default)."""
        names = tuple(names or self.param_names)
        key = (tuple(self.tasks), names)
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=16)
            h.update(json.dumps(self.tasks).encode())
            for n in names:
                h.update(n.encode())
                stacked = self.deltas(n).contiguous()
                h.update(str(tuple(stacked.shape)).encode())
                h.update(stacked.numpy().tobytes())
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]

    def validate(self) -> None:
        """Read every tensor once (one at a time) to check values are finite."""
        for name in self.param_names:
            self.deltas(name)

    def summary(self) -> dict:
        counts = {k: 0 for k in KINDS}
        for n in self.param_names:
            counts[self.kind(n)] += _numel(self.shape(n))
        depths = [d for d in (self.depth(n) for n in self.param_names) if d is not None]
        return {"tasks": self.tasks, "parameters_by_kind": counts,
                "layers": (max(depths) + 1) if depths else 0, "tensors": len(self.param_names)}

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """One safetensors file: base and every task delta, JSON metadata in its header.

        Written atomically, and never inside a folder a source was read from.
        """
        path = Path(path).expanduser().resolve()
        for label, origin in self.sources.items():
            if origin.startswith("<"):
                continue
            src = Path(origin).resolve()
            src_dir = src if src.is_dir() else src.parent
            if path.parent == src_dir or src_dir in path.parents:
                raise ValidationError(f"refusing to write {path} inside the input folder {src_dir} of {label!r}; "
                                      "choose an output path outside your checkpoint folders")
        tensors = {f"base::{n}": self.base.get(n).contiguous() for n in self.base.keys()}
        for task in self.tasks:
            for n in self.param_names:
                tensors[f"delta::{task}::{n}"] = self.delta(task, n).contiguous()
        meta = {"format": "mergescope.taskvectorset", "version": FORMAT_VERSION, "tasks": self.tasks,
                "sources": self.sources, "exclude": [p.pattern for p in self.exclude],
                "order": list(self.base.keys()),
                "kinds": {n: self.kind(n) for n in self.param_names}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, path, {"mergescope": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskVectorSet":
        path = Path(path).expanduser()
        meta = read_safetensors_metadata(path).get("mergescope")
        if not meta:
            raise CheckpointError(f"{path}: not a saved task-vector set (no 'mergescope' metadata in its header)")
        meta = json.loads(meta)
        base = SafetensorsSource([path], origin=str(path), prefix="base::", order=meta.get("order"))
        tasks = {t: _StoredDeltas(SafetensorsSource([path], origin=str(path), prefix=f"delta::{t}::"), str(path))
                 for t in meta["tasks"]}
        return cls(base, tasks, meta.get("exclude", []), meta.get("sources"))


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write to a temporary file beside `path`, then rename: never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _unique_tasks(tasks) -> dict:
    pairs = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    seen: dict = {}
    for name, value in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ValidationError(f"task names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValidationError(f"duplicate task name {name!r}: every task needs its own name")
        if "::" in name:
            raise ValidationError(f"task name {name!r} may not contain '::'")
        seen[name] = value
    if not seen:
        raise ValidationError("a task-vector set needs at least one task")
    return seen


def _check_finite(t: torch.Tensor, where: str, name: str, task: str | None = None) -> None:
    if t.dtype.is_floating_point and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        of = f" (task {task!r})" if task else ""
        raise ValidationError(f"{where}: tensor {name!r}{of} has {bad} NaN/Inf value(s)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
