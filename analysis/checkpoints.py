"""Read state dicts lazily from the formats merging research meets.

A `TensorSource` is a read-only mapping name -> tensor that knows every
tensor's shape and dtype up front (from file headers where the format has
them) and reads the data of one tensor only when asked. Supported:

- a single ``.safetensors`` file;
- a Hugging Face model folder: ``model.safetensors``, sharded
  ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
  ``pytorch_model.bin`` (or its sharded index);
- a torch state-dict file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), loaded with
  ``weights_only=True`` and memory-mapped;
- a pickled whole-module checkpoint (open_clip task-vector checkpoints) only
  with ``trust_pickle=True``;
- a PEFT LoRA adapter folder, read as per-weight deltas (`LoraAdapter`).

Nothing here ever writes to disk.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from analysis.errors import CheckpointError

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class TensorSource:
    """Lazily read tensors; `reads` counts how many tensors were materialised."""

    origin: str

    def __init__(self, origin: str):
        self.origin = origin
        self.reads = 0

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """The file a tensor lives in, for error messages."""
        return self.origin

    def get(self, name: str) -> torch.Tensor:
        if name not in self._key_set():
            raise CheckpointError(f"{self.origin}: no tensor named {name!r}")
        self.reads += 1
        return self._read(name)

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def __contains__(self, name: str) -> bool:
        return name in self._key_set()

    def __len__(self) -> int:
        return len(self._key_set())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}


class DictSource(TensorSource):
    """A state dict already in memory."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], origin: str = "<state dict>"):
        super().__init__(origin)
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{origin}: entry {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}, not a tensor")
        self._sd = dict(state_dict)

    def keys(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def dtype(self, name):
        return self._sd[name].dtype

    def _read(self, name):
        return self._sd[name]


class SafetensorsSource(TensorSource):
    """One or several (sharded) safetensors files, memory-mapped, one tensor per read."""

    def __init__(self, files: Iterable[Path], origin: str | None = None, prefix: str = "",
                 order: Iterable[str] | None = None):
        files = [Path(f) for f in files]
        super().__init__(origin or str(files[0] if len(files) == 1 else files[0].parent))
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in files:
            _check_nonempty(f)
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file ({exc}); it may be truncated or corrupt") from exc
            self._handles[f] = handle
            for name in names:
                if prefix and not name.startswith(prefix):
                    continue
                sl = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{f}: tensor {name!r} has dtype {sl.get_dtype()} which torch cannot hold")
                key = name[len(prefix):]
                self._file_of[key] = f
                self._meta[key] = (tuple(sl.get_shape()), dtype)
        if order is not None:  # safetensors stores keys sorted; restore the model's own order
            order = [k for k in order if k in self._meta]
            self._meta = {k: self._meta[k] for k in order + [k for k in self._meta if k not in set(order)]}
        self._prefix = prefix

    @classmethod
    def from_index(cls, index_path: Path) -> "SafetensorsSource":
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object mapping tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (index_path.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: lists shard {missing[0]!r} which is not in {index_path.parent}")
        src = cls([index_path.parent / s for s in shards], origin=str(index_path.parent))
        absent = [k for k, s in weight_map.items() if src._file_of.get(k) != index_path.parent / s]
        if absent:
            raise CheckpointError(f"{index_path}: tensor {absent[0]!r} is not in shard {weight_map[absent[0]]!r}; the checkpoint is incomplete")
        return src

    def keys(self):
        return list(self._meta)

    def shape(self, name):
        return self._meta[name][0]

    def dtype(self, name):
        return self._meta[name][1]

    def where(self, name):
        return str(self._file_of.get(name, self.origin))

    def _read(self, name):
        f = self._file_of[name]
        try:
            return self._handles[f].get_tensor(self._prefix + name)
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({exc}); the file may be truncated") from exc


class TorchFileSource(TensorSource):
    """A torch state dict loaded with weights_only=True, memory-mapped when possible."""

    def __init__(self, files: Iterable[Path], trust_pickle: bool = False, origin: str | None = None):
        files = [Path(f) for f in files]
        super().__init__(origin or str(files[0] if len(files) == 1 else files[0].parent))
        self._sd: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            sd = load_torch_file(f, trust_pickle=trust_pickle)
            for k, v in sd.items():
                self._sd[k] = v
                self._file_of[k] = f

    def keys(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def dtype(self, name):
        return self._sd[name].dtype

    def where(self, name):
        return str(self._file_of.get(name, self.origin))

    def _read(self, name):
        return self._sd[name]


def load_torch_file(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a torch file.

    Plain state dicts load with weights_only=True (no code runs). A pickled
    whole module (open_clip checkpoints) needs arbitrary code execution to
    unpickle, so it is refused unless the caller trusts the file.
    """
    path = Path(path)
    _check_nonempty(path)
    mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be mmapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: this file is a pickled Python object (e.g. a whole open_clip module), not a plain "
                "state dict. Unpickling it can run arbitrary code, so it is refused by default. If you trust "
                "its source, load it with trust_pickle=True (in the app: tick 'trust pickled checkpoints'); "
                "the classes it refers to must be importable."
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"{path}: cannot unpickle even with trust_pickle=True ({exc2})") from exc2
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); it may be truncated or corrupt") from exc
    return _flatten_state(obj, path)


def _flatten_state(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, (Mapping, torch.nn.Module)) and not isinstance(inner, torch.Tensor):
                return _flatten_state(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise CheckpointError(f"{path}: holds a mapping with no tensors (keys: {list(obj)[:5]})")
        return tensors
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict or a module")


def _check_nonempty(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc


def is_lora_adapter(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def open_checkpoint(path: str | Path, trust_pickle: bool = False) -> TensorSource:
    """Open a full-model checkpoint (file or Hugging Face folder) lazily."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _open_index(path, trust_pickle)
        if path.suffix == ".safetensors":
            return SafetensorsSource([path])
        if path.suffix in TORCH_SUFFIXES:
            return TorchFileSource([path], trust_pickle=trust_pickle)
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, "
                              f"{', '.join(sorted(TORCH_SUFFIXES))} or a model folder")
    if is_lora_adapter(path):
        raise CheckpointError(f"{path}: is a PEFT LoRA adapter, not a full model; give it as a task over a base model")
    for candidate in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                      "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (path / candidate).is_file():
            return open_checkpoint(path / candidate, trust_pickle=trust_pickle)
    loose = sorted(path.glob("*.safetensors"))
    if len(loose) == 1:
        return SafetensorsSource(loose)
    found = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(f"{path}: no model weights found; expected model.safetensors, a sharded "
                          f"model.safetensors.index.json, or pytorch_model.bin (found: {found or 'nothing'})")


def _open_index(path: Path, trust_pickle: bool) -> TensorSource:
    if path.name.startswith("model.safetensors") or path.name.endswith(".safetensors.index.json"):
        return SafetensorsSource.from_index(path)
    weight_map = _read_json(path).get("weight_map") or {}
    if not weight_map:
        raise CheckpointError(f"{path}: expected a non-empty 'weight_map'")
    shards = sorted(set(weight_map.values()))
    return TorchFileSource([path.parent / s for s in shards], trust_pickle=trust_pickle, origin=str(path.parent))


# ---------------------------------------------------------------- PEFT LoRA

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


class LoraAdapter:
    """A PEFT LoRA adapter read as deltas on a base model's weight names.

    delta(W) = scale · B @ A with scale = alpha / r (alpha / sqrt(r) with
    rsLoRA); r and alpha follow `rank_pattern` / `alpha_pattern`, and the
    product is transposed when `fan_in_fan_out` (GPT-2 style Conv1D).
    """

    def __init__(self, folder: str | Path, base_keys: Iterable[str], base_shapes: Mapping[str, tuple] | None = None):
        self.folder = Path(folder)
        self.config_path = self.folder / "adapter_config.json"
        cfg = _read_json(self.config_path)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self.config_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{self.config_path}: DoRA adapters (use_dora=true) are not supported: their delta is not B @ A")
        self.r = int(cfg.get("r", 8))
        self.alpha = float(cfg.get("lora_alpha", self.r))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.use_rslora = bool(cfg.get("use_rslora", False))
        self.rank_pattern = dict(cfg.get("rank_pattern") or {})
        self.alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        weights = self.folder / "adapter_model.safetensors"
        if weights.is_file():
            self.source: TensorSource = SafetensorsSource([weights])
        elif (self.folder / "adapter_model.bin").is_file():
            self.source = TorchFileSource([self.folder / "adapter_model.bin"])
        else:
            raise CheckpointError(f"{self.folder}: LoRA adapter folder has no adapter_model.safetensors or adapter_model.bin")
        base_keys = list(base_keys)
        self.factors: dict[str, dict[str, str]] = {}  # base weight name -> {"A": key, "B": key, "module": m}
        for key in self.source.keys():
            m = _LORA_KEY.match(key)
            if not m:
                continue  # modules_to_save etc. are not LoRA deltas
            module = m.group("module")
            target = _map_to_base(module + ".weight", base_keys)
            if target is None:
                raise CheckpointError(
                    f"{weights if weights.is_file() else self.folder}: LoRA tensor {key!r} targets module {module!r}, "
                    f"but the base model has no weight named like '{_strip_peft_prefix(module)}.weight'")
            entry = self.factors.setdefault(target, {"module": _strip_peft_prefix(module)})
            entry[m.group("which").replace("embedding_", "E")] = key
        for target, entry in self.factors.items():
            if not ({"A", "B"} <= entry.keys() or {"EA", "EB"} <= entry.keys()):
                raise CheckpointError(f"{self.folder}: LoRA factors for {target!r} are incomplete (found {sorted(entry)})")
        if not self.factors:
            raise CheckpointError(f"{self.folder}: adapter holds no lora_A / lora_B tensors")
        self.base_shapes = dict(base_shapes or {})

    def _scale(self, module: str, rank: int) -> float:
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        if int(r) != rank:
            raise CheckpointError(f"{self.folder}: module {module!r} should have rank {r} by its config, "
                                  f"but its lora_A has {rank} rows")
        return alpha / (r ** 0.5 if self.use_rslora else r)

    def targets(self) -> list[str]:
        return list(self.factors)

    def delta(self, name: str) -> torch.Tensor:
        entry = self.factors[name]
        if "A" in entry:
            a = self.source.get(entry["A"]).float()
            b = self.source.get(entry["B"]).float()
            delta = self._scale(entry["module"], a.shape[0]) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
            if self.fan_in_fan_out:
                delta = delta.T
        else:  # embeddings: lora_embedding_A is (r, vocab), lora_embedding_B is (dim, r)
            a = self.source.get(entry["EA"]).float()
            b = self.source.get(entry["EB"]).float()
            delta = (self._scale(entry["module"], a.shape[0]) * (b @ a)).T
        shape = self.base_shapes.get(name)
        if shape is not None:
            if delta.numel() != _numel(shape):
                raise CheckpointError(f"{self.folder}: LoRA delta for {name!r} has {tuple(delta.shape)} "
                                      f"but the base weight is {tuple(shape)}")
            delta = delta.reshape(shape)
        return delta.contiguous()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _strip_peft_prefix(module: str) -> str:
    return module[len("base_model.model."):] if module.startswith("base_model.model.") else module


def _map_to_base(weight: str, base_keys: list[str]) -> str | None:
    """The base parameter a PEFT module path refers to: exact after removing
    PEFT's wrapper prefix, else the unique base key that is a dotted suffix of
    it or of which it is a dotted suffix (a task model 'bert.encoder...' over a
    base 'encoder...')."""
    name = _strip_peft_prefix(weight)
    keys = set(base_keys)
    if name in keys:
        return name
    matches = [k for k in base_keys if name.endswith("." + k) or k.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # PEFT matches a pattern key against the end of the module's dotted name.
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default
