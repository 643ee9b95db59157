"""Device choice: CUDA, then Apple MPS, then CPU; MERGESCOPE_DEVICE overrides."""
from __future__ import annotations

import os

import torch

from analysis.errors import MergescopeError

ENV_VAR = "MERGESCOPE_DEVICE"


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
