"""Shared fixtures.

`tiny_workspace`: a ui.state.Workspace over a toy two-layer backbone (a real
nn.Module, `ToyBackbone`) with three tasks of feature data, the real
analysis.evaluation.Evaluator (counting its `evaluate` calls in `.calls`) and a
reference table. Built in well under a second with plain torch, so any page
test can inject it with `at.session_state["workspace"] = tiny_workspace`.

`tiny_checkpoints`: the same toy models written as safetensors files (base +
one file per task, with a per-task `classifier.*` head to exclude), for tests
that load through paths.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from analysis.evaluation import Evaluator, FeatureSplit, Head

# Never touch (or see) a user's real cache from tests: a demo built there would
# change what the Home page loads. Tests that want a demo point here themselves.
os.environ["MERGESCOPE_CACHE"] = tempfile.mkdtemp(prefix="mergescope-test-cache-")
# pages score the final subsample in one run (a CPU first estimate is tested on its own: tests/test_refine.py)
os.environ.setdefault("MERGESCOPE_FIRST_ESTIMATE", "0")
# no background merges of neighbouring knob values unless a test asks (tests/test_speculate.py)
os.environ.setdefault("MERGESCOPE_SPECULATE", "0")

TOY_TASKS = ("alpha", "beta", "gamma")
TOY_IN, TOY_HIDDEN, TOY_CLASSES = 8, 16, 3
SPLIT_SIZES = {"train": 96, "validation": 48, "test": 48}


class ToyDense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class ToyScale(nn.Module):
    """An elementwise norm weight (no statistics), so it is a plain vector parameter."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, h):
        return h * self.weight


class ToyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([ToyDense(TOY_IN, TOY_HIDDEN), ToyDense(TOY_HIDDEN, TOY_HIDDEN)])
        self.norm = ToyScale(TOY_HIDDEN)


class ToyBackbone(nn.Module):
    """Two tanh layers and a norm weight: features (B, 16) of inputs (B, 8).

    Parameter names mimic a transformer encoder's, so name-based rules
    (depth, kinds, exclusions) see something familiar.
    """

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        self.encoder = ToyEncoder()
        if state_dict is not None:
            self.load_state_dict(state_dict)

    def forward(self, x):
        for layer in self.encoder.layer:
            x = torch.tanh(layer.dense(x))
        return self.encoder.norm(x)


class CountingEvaluator(Evaluator):
    """The real Evaluator, counting `evaluate` calls (pages must not re-score what they cached)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def evaluate(self, *args, **kwargs):
        self.calls += 1
        return super().evaluate(*args, **kwargs)


def _toy_models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "encoder.layer.0.dense.weight": torch.randn(TOY_HIDDEN, TOY_IN, generator=g) / TOY_IN ** 0.5,
        "encoder.layer.0.dense.bias": torch.zeros(TOY_HIDDEN),
        "encoder.layer.1.dense.weight": torch.randn(TOY_HIDDEN, TOY_HIDDEN, generator=g) / TOY_HIDDEN ** 0.5,
        "encoder.layer.1.dense.bias": torch.zeros(TOY_HIDDEN),
        "encoder.norm.weight": torch.ones(TOY_HIDDEN),
    }
    backbone = ToyBackbone(base)
    data, heads, finetuned = {}, {}, {}
    for t, task in enumerate(TOY_TASKS):
        teacher = torch.randn(TOY_CLASSES, TOY_IN, generator=g)
        splits = {}
        for split, n in SPLIT_SIZES.items():
            x = torch.randn(n, TOY_IN, generator=g)
            splits[split] = FeatureSplit(x, (x @ teacher.T).argmax(1))
        data[task] = splits
        heads[task] = Head(torch.randn(TOY_CLASSES, TOY_HIDDEN, generator=g), torch.zeros(TOY_CLASSES),
                           tuple(f"c{i}" for i in range(TOY_CLASSES)))
        # fine-tune the backbone with the head frozen (the zoo's protocol)
        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        opt = torch.optim.Adam(params.values(), lr=0.05)
        x, y = splits["train"].inputs, splits["train"].labels
        for _ in range(60):
            opt.zero_grad()
            logits = functional_call(backbone, params, (x,)) @ heads[task].weight.T + heads[task].bias
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


def _reference(evaluator: Evaluator, finetuned: dict) -> pd.DataFrame:
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
    evaluator = CountingEvaluator(ToyBackbone(base), data, heads)
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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A user's own tiny BERT set (tests/tinybert.py): base BertModel folder, two fine-tuned
    BertForSequenceClassification folders, a labelled CSV per task. Read-only for tests."""
    import tinybert
    return tinybert.build(tmp_path_factory.mktemp("tinybert"))
