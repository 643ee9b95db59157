"""Device choice: CUDA, then Apple MPS, then CPU; MERGESCOPE_DEVICE overrides.

Memory: $MERGESCOPE_DEVICE_MEMORY (bytes, or with a unit: "512MiB", "8GiB",
"2GB") caps the memory the engine plans for on its device, below what the
device reports free: for a GPU shared with other jobs, and for tests that
need a tiny budget. `out_of_memory(exc)` recognises an allocation failure
on any device (torch.OutOfMemoryError is torch.cuda.OutOfMemoryError).
"""
from __future__ import annotations

import os
import re

import torch

from analysis.errors import MergescopeError, ValidationError

ENV_VAR = "MERGESCOPE_DEVICE"
MEMORY_ENV = "MERGESCOPE_DEVICE_MEMORY"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def get_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device heavy work runs on.

    `preferred` (or $MERGESCOPE_DEVICE) wins when given; it must be usable here.
    """
    choice = preferred if preferred is not None else os.environ.get(ENV_VAR) or None
    if choice is not None:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MergescopeError(f"device {str(choice)!r} was asked for (argument or ${ENV_VAR}) but CUDA is not available")
        if device.type == "mps" and not _mps_available():
            raise MergescopeError(f"device {str(choice)!r} was asked for (argument or ${ENV_VAR}) but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def compute_dtype(device: torch.device) -> torch.dtype:
    """Decompositions and merges run in float32 everywhere: bf16/fp16 SVDs are
    not supported by the solvers and lose the small singular values."""
    return torch.float32


def device_info(device: torch.device | None = None) -> dict:
    """A small, display-ready description of the device in use."""
    device = device or get_device()
    info = {"device": str(device), "type": device.type, "name": "CPU", "memory_gib": None,
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    elif device.type == "mps":
        info["name"] = "Apple MPS"
    return info


def memory_limit() -> int | None:
    """Bytes set by $MERGESCOPE_DEVICE_MEMORY, or None when unset."""
    text = (os.environ.get(MEMORY_ENV) or "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValidationError(f"${MEMORY_ENV}={text!r} is not a memory size; expected bytes or a number with "
                              f"a unit, e.g. 512MiB or 8GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def capped(free_bytes: int) -> int:
    """`free_bytes` lowered to $MERGESCOPE_DEVICE_MEMORY when that is set."""
    limit = memory_limit()
    return free_bytes if limit is None else min(free_bytes, limit)


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU/MPS allocators' RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
