"""Evaluator: backbone parameters -> per-task accuracy and loss.

The backbone is shared; every task keeps its own frozen linear head on the
mean-pooled token states (the analogue of CLIP's zero-shot heads), so any
backbone (pretrained, fine-tuned, merged, base + delta) can be scored on every
task. Heads are never merged and never part of the parameters passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from analysis.device import get_device
from analysis.errors import ValidationError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
COLUMNS = ["task", "metric", "value", "split", "n"]


def canonical_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise ValidationError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return s


@dataclass
class EncodedSplit:
    """Token ids of one task split, padded to a common length (int64 tensors)."""

    input_ids: torch.Tensor       # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor          # (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


@dataclass
class Head:
    """A task's frozen linear classifier on the pooled backbone output."""

    weight: torch.Tensor  # (C, H)
    bias: torch.Tensor    # (C,)
    labels: Sequence[str] = ()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where the attention mask is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_features(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if params:
        out = functional_call(backbone, dict(params), args=(), kwargs=kwargs, strict=False)
    else:
        out = backbone(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden, attention_mask)


class Evaluator:
    """Scores backbone parameters on every task's validation or test split.

    `backbone` holds the base (pretrained) parameters; `evaluate` swaps in the
    given tensors with `torch.func.functional_call`, so the module itself is
    never modified and tensors not given come from the base.
    """

    def __init__(self, backbone: nn.Module, data: Mapping[str, Mapping[str, EncodedSplit]],
                 heads: Mapping[str, Head], device: str | torch.device | None = None,
                 batch_size: int = 128, subsample_seed: int = 0):
        missing = [t for t in data if t not in heads]
        if missing:
            raise ValidationError(f"task {missing[0]!r} has data but no head; heads are {sorted(heads)}")
        self.device = get_device(device)
        self.backbone = backbone.to(self.device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.data = {t: {canonical_split(s): d for s, d in splits.items()} for t, splits in data.items()}
        self.heads = {t: Head(h.weight.detach().float().to(self.device), h.bias.detach().float().to(self.device),
                              list(h.labels)) for t, h in heads.items() if t in data}
        self.batch_size = int(batch_size)
        self.subsample_seed = subsample_seed
        self._shapes = {k: tuple(v.shape) for k, v in self.backbone.state_dict().items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def split_size(self, task: str, split: str) -> int:
        return len(self._split(task, split))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}

    # ------------------------------------------------------------ scoring
    def evaluate(self, params: Mapping[str, torch.Tensor] | nn.Module | None = None, split: str = "validation",
                 subsample: int | None = None, tasks: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy table (task, metric in {accuracy, loss}, value, split, n).

        `params` is a full or partial backbone state dict (missing tensors come
        from the base), a module with such a state dict, or None for the base.
        `subsample=n` scores a fixed, seeded subset of n examples per task.
        """
        split = canonical_split(split)
        prepared = self._prepare(params)
        rows = []
        for task in self._tasks(tasks):
            acc, loss, n = self._score(task, split, prepared, subsample)
            rows.append({"task": task, "metric": "accuracy", "value": acc, "split": split, "n": n})
            rows.append({"task": task, "metric": "loss", "value": loss, "split": split, "n": n})
        return pd.DataFrame(rows, columns=COLUMNS)

    def evaluate_delta(self, delta: Mapping[str, torch.Tensor], alpha: float = 1.0, split: str = "validation",
                       subsample: int | None = None, tasks: Sequence[str] | None = None) -> pd.DataFrame:
        """Score base + alpha * delta (delta: parameter name -> tensor)."""
        base = self.backbone.state_dict()
        params = {}
        for name, d in delta.items():
            if name not in base:
                raise ValidationError(f"delta holds {name!r}, which is not a backbone parameter")
            if tuple(d.shape) != tuple(base[name].shape):
                raise ValidationError(f"delta for {name!r} has shape {tuple(d.shape)}, the backbone has {tuple(base[name].shape)}")
            params[name] = base[name] + float(alpha) * d.to(self.device, base[name].dtype)
        return self.evaluate(params, split=split, subsample=subsample, tasks=tasks)

    def predictions(self, params=None, task: str | None = None, split: str = "validation") -> np.ndarray:
        """Predicted class index of every example of one task split (data order)."""
        prepared = self._prepare(params)
        logits = self._logits(task, canonical_split(split), prepared, None)[0]
        return logits.argmax(1).cpu().numpy()

    # ------------------------------------------------------------ internals
    def _tasks(self, tasks) -> list[str]:
        tasks = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in tasks if t not in self.data]
        if unknown:
            raise ValidationError(f"no task named {unknown[0]!r}; the evaluator has {self.tasks}")
        return tasks

    def _split(self, task: str, split: str) -> EncodedSplit:
        split = canonical_split(split)
        if split not in self.data[task]:
            raise ValidationError(f"task {task!r} has no {split!r} split; it has {sorted(self.data[task])}")
        return self.data[task][split]

    def _prepare(self, params) -> dict[str, torch.Tensor] | None:
        if params is None:
            return None
        if isinstance(params, nn.Module):
            params = params.state_dict()
        out = {}
        for name, t in params.items():
            if name not in self._shapes:
                raise ValidationError(f"parameter {name!r} is not in the backbone (heads are per task and never passed in)")
            if tuple(t.shape) != self._shapes[name]:
                raise ValidationError(f"parameter {name!r} has shape {tuple(t.shape)}, the backbone expects {self._shapes[name]}")
            if not t.dtype.is_floating_point:
                continue  # integer buffers (position ids) come from the base
            out[name] = t.to(self.device, torch.float32)
        return out

    def _indices(self, n_total: int, subsample: int | None) -> torch.Tensor:
        if subsample is None or subsample >= n_total:
            return torch.arange(n_total)
        if subsample < 1:
            raise ValidationError(f"subsample must be a positive number of examples, got {subsample}")
        g = torch.Generator().manual_seed(self.subsample_seed)
        return torch.randperm(n_total, generator=g)[:subsample].sort().values

    @torch.no_grad()
    def _logits(self, task, split, params, subsample):
        data = self._split(task, split)
        idx = self._indices(len(data), subsample)
        lengths = data.lengths()[idx]
        order = idx[torch.argsort(lengths, descending=True, stable=True)]  # less padding per batch
        head = self.heads[task]
        logits = torch.empty(len(idx), head.weight.shape[0])
        for start in range(0, len(order), self.batch_size):
            b = order[start:start + self.batch_size]
            width = int(data.attention_mask[b].sum(1).max())
            ids = data.input_ids[b, :width].to(self.device)
            mask = data.attention_mask[b, :width].to(self.device)
            feats = pooled_features(self.backbone, ids, mask, params)
            logits[start:start + len(b)] = (feats @ head.weight.T + head.bias).float().cpu()
        # back to the subset's data order (idx is ascending)
        return logits[torch.argsort(order)], data.labels[idx]

    def _score(self, task, split, params, subsample):
        logits, labels = self._logits(task, split, params, subsample)
        if len(labels) == 0:
            return float("nan"), float("nan"), 0
        acc = float((logits.argmax(1) == labels).float().mean())
        loss = float(nn.functional.cross_entropy(logits, labels))
        return acc, loss, int(len(labels))


# ---------------------------------------------------------------- normalised scores
def _by_task(x) -> pd.Series | float:
    if isinstance(x, pd.DataFrame):
        acc = x[x["metric"] == "accuracy"] if "metric" in x else x
        return acc.groupby("task", sort=False)["value"].mean()
    if isinstance(x, Mapping):
        return pd.Series(dict(x), dtype=float)
    return float(x)


def _tidy(values, metric: str):
    if isinstance(values, pd.Series):
        return pd.DataFrame({"task": values.index, "metric": metric, "value": values.values})
    return values


def normalized_accuracy(merged, fine_tuned):
    """merged / fine-tuned accuracy, per task.

    Accepts floats, {task: accuracy} mappings or tidy evaluation tables; tables
    and mappings give a tidy table (task, metric, value).
    """
    m, f = _by_task(merged), _by_task(fine_tuned)
    if isinstance(m, pd.Series) or isinstance(f, pd.Series):
        m, f = _align(m, f)
    return _tidy(_ratio(m, f), "normalized_accuracy")


def normalized_accuracy_improvement(merged, zero_shot, fine_tuned):
    """(merged - zero-shot) / (fine-tuned - zero-shot), per task (NAI)."""
    m, z, f = _by_task(merged), _by_task(zero_shot), _by_task(fine_tuned)
    if any(isinstance(v, pd.Series) for v in (m, z, f)):
        m, z = _align(m, z)
        m, f = _align(m, f)
        z = z.reindex(m.index)
    return _tidy(_ratio(m - z, f - z), "normalized_accuracy_improvement")


def _ratio(num, den):
    """num / den; NaN where den is 0 (the score is undefined there)."""
    if isinstance(num, pd.Series) or isinstance(den, pd.Series):
        return num / den.where(den != 0)
    return float("nan") if den == 0 else num / den


def _align(a, b):
    if not isinstance(a, pd.Series) or not isinstance(b, pd.Series):
        raise ValidationError("normalised scores need both sides per task (tables or mappings), or both as numbers")
    missing = [t for t in a.index if t not in b.index]
    if missing:
        raise ValidationError(f"task {missing[0]!r} has a merged score but no reference score")
    return a, b.reindex(a.index)
