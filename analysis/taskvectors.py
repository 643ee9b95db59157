"""TaskVectorSet: a base model's parameters plus named task deltas, read lazily.

Per-parameter access (`delta(task, name)`) reads exactly the two tensors it
needs (fine-tuned and base), so a 7B model never needs 7B x T floats in RAM.

Resident sets: `tvs.keep_resident(device)` checks, from the file headers
only, whether every parameter's stacked deltas (T, *shape) float32 fit a
memory budget (half the free memory of a GPU, else half the available RAM).
If they do, each parameter is read and validated (finite values) once, on
first use or all at once with `materialize()`, and kept stacked on that
device: later `deltas()` / `delta()` calls read nothing and check nothing
(`tvs.reads` counts the tensors read from checkpoints). If they do not fit,
the set streams as before (one parameter at a time from disk), and still
checks each parameter's values only the first time it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from analysis.checkpoints import (DictSource, LoraAdapter, SafetensorsSource, TensorSource,
                                  is_lora_adapter, open_checkpoint)
from analysis.atomic import atomic_save_safetensors  # noqa: F401  (re-exported: older callers import it from here)
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


_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|blocks|resblocks|h)\.\d+\.)")


def module_of(name: str) -> str:
    """The parameter's name inside its block ('encoder.layer.3.attention.q.weight'
    -> 'attention.q.weight'), so the same module can be followed across depth."""
    m = _BLOCK.match(name)
    return name[m.end():] if m else name


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
        self._digests: dict[str, bytes] = {}   # name -> BLAKE2b of its stacked deltas (fingerprint)
        self.reads = 0                  # tensors read from checkpoints (base and task deltas) by this set
        self._checked: set[str] = set()  # parameters whose base and task values were found finite
        self._resident: dict[str, torch.Tensor] = {}   # name -> (T, *shape) float32 on resident_device
        self.resident_device: torch.device | None = None  # None: streaming (nothing kept)
        self._parent: tuple["TaskVectorSet", list[int]] | None = None  # subset of a resident set
        self._lock = threading.RLock()   # one set is shared by the app's sessions

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
    def from_sources(cls, base: TensorSource, finetuned: Mapping[str, TensorSource],
                     exclude: Iterable[str] = ()) -> "TaskVectorSet":
        """Base + {task: full fine-tuned model} given as opened TensorSources (e.g. renamed views
        of Hugging Face checkpoints, `analysis.ownset`); checked like `from_checkpoints`."""
        tasks = {task: _FullModelDeltas(src) for task, src in _unique_tasks(finetuned).items()}
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

    def layer_meta(self, name: str) -> dict:
        """The layer-metadata columns every per-layer table starts with:
        param, depth, kind, module."""
        return {"param": name, "depth": self.depth(name), "kind": self.kind(name), "module": module_of(name)}

    def names_of_kind(self, *kinds: str) -> list[str]:
        return [n for n in self.param_names if self.kind(n) in kinds]

    def base_tensor(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        self.reads += 1
        if t.dtype.is_floating_point and name not in self._checked:
            _check_finite(t, self.base.where(name), name)
        return t

    def delta(self, task: str, name: str) -> torch.Tensor:
        """Fine-tuned minus base for one parameter, float32, on the CPU.

        From the resident stack when the set is resident (a view on a CPU, a
        copy from a GPU; nothing read or checked again); else it reads two
        tensors. Do not modify the result in place: it may be the set's own
        storage."""
        if task not in self._tasks:
            raise ValidationError(f"no task named {task!r}; tasks are {self.tasks}")
        self._require_param(name)
        stacked = self._kept(name)
        if stacked is not None:
            return stacked[self.tasks.index(task)].cpu()
        deltas = self._tasks[task]
        base = self.base_tensor(name)
        d = deltas.delta(name, base)
        self.reads += 1
        if name not in self._checked:
            where = deltas.source.where(name) if hasattr(deltas, "source") else deltas.origin
            _check_finite(d, where, name, task)
        return d

    def deltas(self, name: str, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """All tasks' deltas of one parameter stacked: (T, *shape) float32.

        Resident set: the kept tensor itself, on `resident_device`, read and
        validated once (do not modify it in place). Streaming set: read now,
        on the CPU (the base once, then each task)."""
        self._require_param(name)
        order = list(tasks) if tasks else self.tasks
        unknown = [t for t in order if t not in self._tasks]
        if unknown:
            raise ValidationError(f"no task named {unknown[0]!r}; tasks are {self.tasks}")
        stacked = self._kept(name)
        if stacked is None:
            return self._read_stacked(name, order)
        if order == self.tasks:
            return stacked
        idx = torch.tensor([self.tasks.index(t) for t in order], device=stacked.device)
        return stacked.index_select(0, idx)

    def _read_stacked(self, name: str, tasks: Sequence[str]) -> torch.Tensor:
        """Read one parameter's deltas from the checkpoints; values checked the first time only."""
        base = self.base_tensor(name)
        out = []
        for task in tasks:
            deltas = self._tasks[task]
            out.append(deltas.delta(name, base))
            self.reads += 1
        stacked = torch.stack(out)
        if name not in self._checked:
            if not bool(torch.isfinite(stacked).all()):
                for task, d in zip(tasks, out):
                    src = self._tasks[task]
                    _check_finite(d, src.source.where(name) if hasattr(src, "source") else src.origin, name, task)
            if list(tasks) == self.tasks:
                self._checked.add(name)
        return stacked

    # ------------------------------------------------------------ residency
    @property
    def is_resident(self) -> bool:
        return self.resident_device is not None

    def stacked_bytes(self) -> int:
        """Bytes of every parameter's stacked float32 deltas (from the headers, nothing read)."""
        return 4 * len(self.tasks) * sum(_numel(self.shape(n)) for n in self.param_names)

    def keep_resident(self, device: str | torch.device | None = None, *,
                      budget_bytes: int | None = None) -> torch.device | None:
        """Keep every parameter's stacked deltas on `device` (default: `get_device()`)
        once read, if they fit; returns the device they will live on, or None.

        The check uses file headers only. Budget: `budget_bytes`, else half the
        free memory of a CUDA device, else half the available RAM. A GPU that
        is too small falls back to the CPU's RAM (deltas then still need no
        re-reading; a merge copies them to the GPU). A set too large for both
        keeps streaming from disk. Calling it again on a resident set keeps
        what it holds (same device) or moves it (another device that fits)."""
        from analysis.device import get_device
        want = get_device(device)
        need = self.stacked_bytes()
        candidates = [want] if want.type == "cpu" else [want, torch.device("cpu")]
        with self._lock:
            for dev in candidates:
                budget = budget_bytes if budget_bytes is not None else memory_budget(dev)
                if need - self._resident_bytes_on(dev) <= budget:   # what it holds there is not new
                    if self.resident_device is not None and self.resident_device != dev:
                        self._resident = {n: t.to(dev) for n, t in self._resident.items()}
                    self.resident_device = dev
                    return dev
            self.resident_device = None
            self._resident = {}
            return None

    def _resident_bytes_on(self, device: torch.device) -> int:
        return sum(t.numel() * t.element_size() for t in self._resident.values() if t.device == device)

    def materialize(self, progress: Callable[[int, int, str], None] | None = None) -> "TaskVectorSet":
        """Read and validate every parameter now (resident: and keep it); `progress(done, total, name)`."""
        total = len(self.param_names)
        for i, name in enumerate(self.param_names):
            if self._kept(name) is None and name not in self._checked:
                self._read_stacked(name, self.tasks)
            if progress is not None:
                progress(i + 1, total, name)
        return self

    def _kept(self, name: str) -> torch.Tensor | None:
        """The resident stack of `name` (read and validated on first use), or None when streaming."""
        if self.resident_device is None:
            return None
        t = self._resident.get(name)
        if t is not None:
            return t
        with self._lock:
            t = self._resident.get(name)
            if t is None:
                if self._parent is not None and self._parent[0].is_resident:
                    parent, idx = self._parent
                    full = parent.deltas(name)
                    if idx == list(range(idx[0], idx[0] + len(idx))):
                        t = full[idx[0]:idx[0] + len(idx)]         # a view: shared, no copy
                    else:
                        return full.index_select(0, torch.tensor(idx, device=full.device))
                else:
                    t = self._read_stacked(name, self.tasks).to(self.resident_device)
                self._resident[name] = t
        return t

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
        """One task's deltas as a TaskVector (CPU tensors, like `delta`)."""
        return TaskVector({n: self.delta(task, n) for n in (names or self.param_names)})

    def sum(self, tasks: Sequence[str] | None = None, names: Iterable[str] | None = None) -> TaskVector:
        """Σ_t τ_t per parameter, on the CPU like every TaskVector (summed where the deltas live)."""
        names = list(names or self.param_names)
        return TaskVector({n: self.deltas(n, tasks).sum(0).cpu() for n in names})

    def subset(self, tasks: Sequence[str]) -> "TaskVectorSet":
        unknown = [t for t in tasks if t not in self._tasks]
        if unknown:
            raise ValidationError(f"no task named {unknown[0]!r}; tasks are {self.tasks}")
        sub = TaskVectorSet(self.base, {t: self._tasks[t] for t in tasks}, [p.pattern for p in self.exclude],
                            {k: v for k, v in self.sources.items() if k == "base" or k in tasks})
        sub._checked = set(self._checked)
        if self.is_resident:
            # served from this set's resident stacks (views when the tasks are a contiguous run)
            sub._parent = (self, [self.tasks.index(t) for t in tasks])
            sub.resident_device = self.resident_device
        return sub

    def apply(self, delta: Mapping[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
        """Full state dict: base + alpha * delta (base dtype); other tensors from the base."""
        unknown = [k for k in delta if k not in self.param_names]
        if unknown:
            raise ValidationError(f"delta holds {unknown[0]!r}, which is not a parameter of this set")
        out = {}
        for name in self.base.keys():
            t = self.base.get(name)
            self.reads += 1
            if name in delta:
                t = (t.float() + alpha * delta[name].to("cpu", torch.float32)).to(t.dtype)
            out[name] = t
        return out

    def fingerprint(self, names: Iterable[str] | None = None) -> str:
        """Content hash of the task vectors over `names` (all parameters by default).

        BLAKE2b over the task list and one 16-byte BLAKE2b digest per parameter (its name,
        shape and stacked float32 deltas). Per-parameter digests are kept, so another subset
        of names (the spectral cache hashes the matrices only) hashes nothing again, and are
        computed on a thread pool (hashlib releases the GIL): hashing the quick demo's 727 MB
        in one thread was 37 % of the Spectra page's first render on an H100 machine."""
        names = tuple(names or self.param_names)
        key = (tuple(self.tasks), names)
        with self._lock:
            if key not in self._fingerprints:
                self._digest(names)
                h = hashlib.blake2b(digest_size=16)
                h.update(json.dumps(self.tasks).encode())
                for n in names:
                    h.update(self._digests[n])
                self._fingerprints[key] = h.hexdigest()
            return self._fingerprints[key]

    def _digest(self, names: Sequence[str]) -> None:
        """Fill self._digests for `names`: tensors are read here one at a time and hashed on
        up to os.cpu_count() threads, at most twice that many held in host memory at once."""
        from concurrent.futures import ThreadPoolExecutor

        def digest(n: str, host: torch.Tensor) -> tuple[str, bytes]:
            h = hashlib.blake2b(digest_size=16)
            h.update(n.encode())
            h.update(str(tuple(host.shape)).encode())
            h.update(memoryview(host.numpy()).cast("B"))
            return n, h.digest()

        todo = [n for n in dict.fromkeys(names) if n not in self._digests]
        if not todo:
            return
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="fingerprint") as pool:
            pending = []
            for n in todo:
                pending.append(pool.submit(digest, n, self.deltas(n).cpu().contiguous()))
                if len(pending) >= 2 * workers:
                    self._digests.update([pending.pop(0).result()])
            self._digests.update(f.result() for f in pending)

    def validate(self) -> None:
        """Read every tensor once (one at a time) to check values are finite
        (resident sets keep what they read: see `materialize`)."""
        self.materialize()

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


def memory_budget(device: torch.device) -> int:
    """Bytes a resident set may take on `device`: half its free memory (CUDA),
    else half the RAM the OS reports available (0 when it cannot tell); either
    capped by $MERGESCOPE_DEVICE_MEMORY (analysis.device)."""
    from analysis.device import capped
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return capped(free) // 2
    return capped(available_ram()) // 2


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


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
