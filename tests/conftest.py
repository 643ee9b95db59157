"""Shared fixtures.

`tiny_workspace`: a ui.state.Workspace over a toy two-layer backbone with three
tasks, a real evaluator (same interface as analysis.evaluation.Evaluator:
`tasks`, `heads`, `evaluate`, `evaluate_delta`) and a reference table. Built in
well under a second with plain torch, so any page test can inject it with
`at.session_state["workspace"] = tiny_workspace`.

`tiny_checkpoints`: the same toy models written as safetensors files (base +
one file per task, with a per-task `classifier.*` head to exclude), for tests
that load through paths.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

# Never touch a user's real cache from tests.
os.environ.setdefault("MERGESCOPE_CACHE", tempfile.mkdtemp(prefix="mergescope-test-cache-"))

TOY_TASKS = ("alpha", "beta", "gamma")
TOY_IN, TOY_HIDDEN, TOY_CLASSES = 8, 16, 3
SPLIT_SIZES = {"train": 96, "validation": 48, "test": 48}


@dataclass
class ToyHead:
    weight: torch.Tensor
    bias: torch.Tensor
    labels: tuple = ()


def toy_forward(params: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["encoder.layer.0.dense.weight"].T + params["encoder.layer.0.dense.bias"])
    h = torch.tanh(h @ params["encoder.layer.1.dense.weight"].T + params["encoder.layer.1.dense.bias"])
    return h * params["encoder.norm.weight"]


class ToyEvaluator:
    """Scores toy backbone parameters per task: accuracy and cross-entropy loss."""

    def __init__(self, base: dict, data: dict, heads: dict, subsample_seed: int = 0):
        self.base = {k: v.clone() for k, v in base.items()}
        self.data = data
        self.heads = heads
        self.subsample_seed = subsample_seed
        self.calls = 0

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def evaluate(self, params=None, split="validation", subsample=None, tasks=None) -> pd.DataFrame:
        from analysis.errors import ValidationError
        self.calls += 1
        p = dict(self.base)
        for k, v in (params or {}).items():
            if k not in p:
                raise ValidationError(f"parameter {k!r} is not in the backbone")
            p[k] = v.float()
        rows = []
        for task in (tasks or self.tasks):
            x, y = self.data[task][split]
            if subsample is not None and subsample < len(y):
                g = torch.Generator().manual_seed(self.subsample_seed)
                idx = torch.randperm(len(y), generator=g)[:subsample].sort().values
                x, y = x[idx], y[idx]
            head = self.heads[task]
            logits = toy_forward(p, x) @ head.weight.T + head.bias
            acc = float((logits.argmax(1) == y).float().mean())
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            rows += [{"task": task, "metric": "accuracy", "value": acc, "split": split, "n": len(y)},
                     {"task": task, "metric": "loss", "value": loss, "split": split, "n": len(y)}]
        return pd.DataFrame(rows, columns=["task", "metric", "value", "split", "n"])

    def evaluate_delta(self, delta, alpha=1.0, **kwargs) -> pd.DataFrame:
        params = {k: self.base[k] + alpha * d.float() for k, d in delta.items()}
        return self.evaluate(params, **kwargs)


def _toy_models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "encoder.layer.0.dense.weight": torch.randn(TOY_HIDDEN, TOY_IN, generator=g) / TOY_IN ** 0.5,
        "encoder.layer.0.dense.bias": torch.zeros(TOY_HIDDEN),
        "encoder.layer.1.dense.weight": torch.randn(TOY_HIDDEN, TOY_HIDDEN, generator=g) / TOY_HIDDEN ** 0.5,
        "encoder.layer.1.dense.bias": torch.zeros(TOY_HIDDEN),
        "encoder.norm.weight": torch.ones(TOY_HIDDEN),
    }
    data, heads, finetuned = {}, {}, {}
    for t, task in enumerate(TOY_TASKS):
        teacher = torch.randn(TOY_CLASSES, TOY_IN, generator=g)
        splits = {}
        for split, n in SPLIT_SIZES.items():
            x = torch.randn(n, TOY_IN, generator=g)
            splits[split] = (x, (x @ teacher.T).argmax(1))
        data[task] = splits
        heads[task] = ToyHead(torch.randn(TOY_CLASSES, TOY_HIDDEN, generator=g), torch.zeros(TOY_CLASSES),
                              tuple(f"c{i}" for i in range(TOY_CLASSES)))
        # fine-tune the backbone with the head frozen (the zoo's protocol)
        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        opt = torch.optim.Adam(params.values(), lr=0.05)
        x, y = splits["train"]
        for _ in range(60):
            opt.zero_grad()
            logits = toy_forward(params, x) @ heads[task].weight.T + heads[task].bias
            torch.nn.functional.cross_entropy(logits, y).backward()
            opt.step()
        finetuned[task] = {k: v.detach().clone() for k, v in params.items()}
    return base, finetuned, data, heads


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is faster (and far faster on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_xy():
    """sklearn's 8x8 digits as (x (1797, 64) in [0, 1], y), in the file's own order."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


@pytest.fixture(scope="session")
def _toy():
    return _toy_models()


def _reference(evaluator: ToyEvaluator, finetuned: dict) -> pd.DataFrame:
    rows = []
    for split in ("validation", "test"):
        zs = evaluator.evaluate(None, split=split)
        zs["model"] = "zero_shot"
        rows.append(zs)
        for task, sd in finetuned.items():
            ft = evaluator.evaluate(sd, split=split, tasks=[task])
            ft["model"] = "fine_tuned"
            rows.append(ft)
    ref = pd.concat(rows, ignore_index=True)
    return ref[["task", "model", "split", "metric", "value"]]


@pytest.fixture
def tiny_workspace(_toy):
    """A Workspace (toy backbone, tasks alpha/beta/gamma) with evaluator and reference."""
    from analysis.taskvectors import TaskVectorSet
    from ui.state import Workspace
    base, finetuned, data, heads = _toy
    tvs = TaskVectorSet.from_state_dicts(base, finetuned)
    evaluator = ToyEvaluator(base, data, heads)
    return Workspace(name="tiny", tvs=tvs, evaluator=evaluator, reference=_reference(evaluator, finetuned),
                     extras={"heads": heads})


@pytest.fixture
def tiny_checkpoints(_toy, tmp_path) -> dict:
    """Safetensors files of the toy models: {"base": path, "tasks": {task: path}, "dir": folder}.

    Each file also carries a `classifier.*` head (different per task), which
    the loader must be told to exclude (regex `^classifier\\.`).
    """
    base, finetuned, _, heads = _toy
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    save_file({**base, "classifier.weight": torch.zeros(TOY_CLASSES, TOY_HIDDEN)}, str(folder / "base.safetensors"))
    tasks = {}
    for task, sd in finetuned.items():
        path = folder / f"{task}.safetensors"
        save_file({**{k: v.contiguous() for k, v in sd.items()}, "classifier.weight": heads[task].weight.contiguous()},
                  str(path))
        tasks[task] = path
    return {"base": folder / "base.safetensors", "tasks": tasks, "dir": folder}


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory) -> Path:
    """A cache folder holding the zoo's tiny demo build (built once per test session).

    Point MERGESCOPE_CACHE at it and `analysis.zoo.load_demo()` finds it.
    Skips when the zoo is not installed.
    """
    zoo = pytest.importorskip("analysis.zoo")
    root = tmp_path_factory.mktemp("tiny-demo-cache")
    zoo.build_tiny_demo(root)
    return root


@pytest.fixture
def tiny_demo_workspace(tiny_demo_dir):
    """A Workspace over the zoo's tiny demo (real BERT-like backbone, Evaluator, heads)."""
    from analysis.zoo import load_demo
    from ui.state import Workspace
    demo = load_demo(tiny_demo_dir)
    return Workspace(name="demo", tvs=demo.tvs, evaluator=demo.evaluator, reference=demo.reference,
                     extras={"demo": demo, "folder": str(demo.root), "heads": demo.evaluator.heads,
                             "hf_base": str(demo.base_path), "cards": demo.cards})
