"""Evaluator: backbone parameters -> per-task accuracy and loss, and the data
statistics that data-driven merges (Fisher, RegMean, ...) need.

The backbone is shared; every task keeps its own frozen linear head on the
pooled backbone output (the analogue of CLIP's zero-shot heads), so any
backbone (pretrained, fine-tuned, merged, base + delta) can be scored on every
task. Heads are never merged and never part of the parameters passed in.

Data come as one split object per task and split:
- `EncodedSplit(input_ids, attention_mask, labels)`: token data; the backbone
  is called `backbone(input_ids=..., attention_mask=...)` and its token states
  are mean-pooled over the attention mask;
- `FeatureSplit(inputs, labels)`: any tensor data; the backbone is called
  `backbone(x)` and returns pooled features (N, H) itself.

Public data API (tensors computed on `ev.device`; statistics come back on the
CPU in float32, Grams in float64). `params` is always a full or partial
backbone state dict swapped in with `torch.func.functional_call` (tensors not
given come from the base); None means the base.

    ev.examples(task, split="train", n=None, seed=0) -> LongTensor
        indices of a fixed seeded subset of n examples (all when n is None or
        >= size), ascending.
    ev.batches(task, split="train", n=None, seed=0, batch_size=None)
        -> iterator of (inputs, labels, token_mask | None) on ev.device, in
        length-sorted batches. `inputs` is a dict of keyword arguments (token
        data) or one tensor passed positionally (feature data).
    ev.logits(inputs, task, params=None) -> Tensor (B, C) on ev.device
        backbone + the task's frozen head; differentiable w.r.t. params.
    ev.hooked({module_name: hook}) -> context manager
    ev.forward_with_hooks(inputs, task, params=None, hooks={module_name: hook})
        forward hooks fn(module, inputs, output) on named backbone submodules,
        always removed afterwards (also on error).
    ev.linear_input_grams(task, split="train", n=256, seed=0, params=None, names=None)
        -> ({weight_name: sum of x x^T (d_in, d_in) float64}, {weight_name: rows})
        x = the input of each nn.Linear, over examples and non-padding tokens.
    ev.per_example_grads(task, split="train", n=256, seed=0, params=None, names=None)
        -> iterator of {param_name: grad of log p(y|x)}, one per example in
        `examples(...)` order.
    ev.fisher_diagonal(task, split="train", n=256, seed=0, params=None, names=None)
        -> {param_name: mean over examples of (grad log p(y|x))^2} (empirical
        Fisher, true labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence, Union

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

    def batch(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Backbone kwargs of examples `idx` and their token mask, cut to the longest row."""
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max()) if len(idx) else 0  # padding is on the right
        mask = mask[:, :width]
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": mask}, mask


@dataclass
class FeatureSplit:
    """Tensor inputs of one task split; the backbone maps a batch (B, ...) to features (B, H)."""

    inputs: torch.Tensor  # (N, ...)
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def lengths(self) -> torch.Tensor:
        return torch.ones(len(self), dtype=torch.long)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The batch's input tensor (passed positionally); no token mask."""
        return self.inputs[idx], None


Split = Union[EncodedSplit, FeatureSplit]
Inputs = Union[Mapping[str, torch.Tensor], torch.Tensor]


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


def features(backbone: nn.Module, inputs: Inputs, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Pooled backbone features (B, H) of one batch.

    `inputs` is a dict of keyword arguments or one tensor passed positionally.
    With `params`, those tensors replace the module's own (functional_call).
    An output with a sequence dimension (HF output, tuple or 3-D tensor) is
    mean-pooled over the inputs' attention_mask (all positions when there is
    none); a 2-D output is already pooled and returned as is.
    """
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    if params:
        out = functional_call(backbone, dict(params), args=args, kwargs=kwargs, strict=False)
    else:
        out = backbone(*args, **kwargs)
    if hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
    elif isinstance(out, torch.Tensor):
        hidden = out
    else:
        hidden = out[0]
    if hidden.dim() == 2:
        return hidden
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    return mean_pool(hidden, mask)


def pooled_features(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    return features(backbone, {"input_ids": input_ids, "attention_mask": attention_mask}, params)


def _to(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


class Evaluator:
    """Scores backbone parameters on every task's validation or test split, and
    computes the data statistics of the module docstring's data API.

    `backbone` holds the base (pretrained) parameters; `evaluate` and the data
    API swap in the given tensors with `torch.func.functional_call`, so the
    module itself is never modified and tensors not given come from the base.
    """

    def __init__(self, backbone: nn.Module, data: Mapping[str, Mapping[str, Split]],
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

    # ------------------------------------------------------------ data API
    def examples(self, task: str, split: str = "train", n: int | None = None, seed: int = 0) -> torch.Tensor:
        """Indices of a fixed, seeded subset of n examples (all when n is None or >= size), ascending."""
        return self._indices(len(self._split(task, split)), n, seed)

    def batches(self, task: str, split: str = "train", n: int | None = None, seed: int = 0,
                batch_size: int | None = None) -> Iterator[tuple[Inputs, torch.Tensor, torch.Tensor | None]]:
        """(inputs, labels, token mask or None) on the device, for the examples of `examples(...)`,
        in batches of similar length (statistics are sums; the order is not data order)."""
        for _, inputs, labels, mask in self._batches(task, split, self.examples(task, split, n, seed), batch_size):
            yield inputs, labels, mask

    def logits(self, inputs: Inputs, task: str, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Backbone (with `params` swapped in) + the task's frozen head, on the device.

        No no_grad here: differentiable w.r.t. params that require grad.
        """
        head = self.heads[self._tasks([task])[0]]
        return features(self.backbone, inputs, self._prepare(params)) @ head.weight.T + head.bias

    @contextmanager
    def hooked(self, hooks: Mapping[str, Callable]):
        """Forward hooks fn(module, inputs, output) on named backbone submodules while inside."""
        modules = dict(self.backbone.named_modules())
        unknown = [name for name in hooks if name not in modules]
        if unknown:
            raise ValidationError(f"the backbone has no submodule {unknown[0]!r}")
        handles = []
        try:
            for name, fn in hooks.items():
                handles.append(modules[name].register_forward_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_with_hooks(self, inputs: Inputs, task: str, params: Mapping[str, torch.Tensor] | None = None,
                           hooks: Mapping[str, Callable] | None = None) -> torch.Tensor:
        """`logits(inputs, task, params)` with forward hooks on named submodules, removed afterwards."""
        with self.hooked(hooks or {}):
            return self.logits(inputs, task, params)

    def linear_input_grams(self, task: str, split: str = "train", n: int | None = 256, seed: int = 0,
                           params: Mapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Sum of x x^T over examples and non-padding tokens of each nn.Linear's input x.

        Keys are weight names (`encoder.layer.0.dense.weight`); `names` limits
        them. Returns (Grams (d_in, d_in) float64 on the CPU, rows summed per
        weight), so a caller can use the sum or the mean. An input shaped like
        the token mask (B, L, d) loses its padding rows; any other input (feature
        data, a pooled (B, d)) counts every row.
        """
        linears = {f"{m}.weight" if m else "weight": m for m, mod in self.backbone.named_modules()
                   if isinstance(mod, nn.Linear)}
        if names is not None:
            unknown = [k for k in names if k not in linears]
            if unknown:
                raise ValidationError(f"{unknown[0]!r} is not the weight of an nn.Linear in the backbone; "
                                      f"those are {sorted(linears)}")
            linears = {k: linears[k] for k in names}
        # MPS has no float64: products in float32 there, sums in float64 on the CPU
        acc = torch.device("cpu") if self.device.type == "mps" else self.device
        grams: dict[str, torch.Tensor] = {}
        rows = {k: 0 for k in linears}
        mask_now: list[torch.Tensor | None] = [None]

        def hook_for(name):
            def hook(module, args, output):
                x, mask = args[0].detach(), mask_now[0]
                if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1])
                x = x.double() if acc == self.device else x.float()
                g = (x.T @ x).to(acc, torch.float64)
                grams[name] = grams[name] + g if name in grams else g
                rows[name] += int(x.shape[0])
            return hook

        prepared = self._prepare(params)  # once, not per batch
        with torch.no_grad(), self.hooked({m: hook_for(k) for k, m in linears.items()}):
            for _, inputs, _, mask in self._batches(task, split, self.examples(task, split, n, seed)):
                mask_now[0] = mask
                features(self.backbone, inputs, prepared)  # the head has no nn.Linear of the backbone
        for k, m in linears.items():
            if k not in grams:  # a layer the forward never reached
                d_in = self.backbone.get_submodule(m).in_features
                grams[k] = torch.zeros(d_in, d_in, dtype=torch.float64)
        return {k: grams[k].cpu() for k in linears}, rows

    def per_example_grads(self, task: str, split: str = "train", n: int | None = 256, seed: int = 0,
                          params: Mapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None
                          ) -> Iterator[dict[str, torch.Tensor]]:
        """{param name: d log p(y|x) / d param} for each example, in `examples(...)` order (CPU, float32).

        Gradients are w.r.t. backbone parameters (all, or `names`) at `params`;
        heads are frozen and never differentiated.
        """
        for grads in self._example_grads(task, split, n, seed, params, names):
            yield {k: g.float().cpu() for k, g in grads.items()}

    def fisher_diagonal(self, task: str, split: str = "train", n: int | None = 256, seed: int = 0,
                        params: Mapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None
                        ) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher: mean over the examples of (d log p(y|x) / d param)^2, true labels."""
        total, count = None, 0
        for grads in self._example_grads(task, split, n, seed, params, names):
            if total is None:
                total = {k: torch.zeros_like(g, dtype=torch.float32) for k, g in grads.items()}
            for k, g in grads.items():
                total[k] += g.float() ** 2
            count += 1
        if total is None:
            raise ValidationError(f"task {task!r} has no examples in its {canonical_split(split)!r} split")
        return {k: (v / count).cpu() for k, v in total.items()}

    # ------------------------------------------------------------ internals
    def _tasks(self, tasks) -> list[str]:
        tasks = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in tasks if t not in self.data]
        if unknown:
            raise ValidationError(f"no task named {unknown[0]!r}; the evaluator has {self.tasks}")
        return tasks

    def _split(self, task: str, split: str) -> Split:
        split = canonical_split(split)
        self._tasks([task])
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

    def _indices(self, n_total: int, subsample: int | None, seed: int | None = None) -> torch.Tensor:
        if subsample is None or subsample >= n_total:
            return torch.arange(n_total)
        if subsample < 1:
            raise ValidationError(f"subsample must be a positive number of examples, got {subsample}")
        g = torch.Generator().manual_seed(self.subsample_seed if seed is None else seed)
        return torch.randperm(n_total, generator=g)[:subsample].sort().values

    def _batches(self, task, split, idx, batch_size=None):
        """(batch indices, inputs, labels, mask) on the device, longest examples first (less padding)."""
        data = self._split(task, split)
        size = int(batch_size or self.batch_size)
        order = idx[torch.argsort(data.lengths()[idx], descending=True, stable=True)]
        for start in range(0, len(order), size):
            b = order[start:start + size]
            inputs, mask = data.batch(b)
            yield (b, _to(inputs, self.device), data.labels[b].to(self.device),
                   None if mask is None else mask.to(self.device))

    @torch.no_grad()
    def _logits(self, task, split, params, subsample):
        data = self._split(task, split)
        idx = self._indices(len(data), subsample)
        head = self.heads[task]
        logits = torch.empty(len(idx), head.weight.shape[0])
        order = []
        for b, inputs, _, _ in self._batches(task, split, idx):
            feats = features(self.backbone, inputs, params)
            logits[len(order):len(order) + len(b)] = (feats @ head.weight.T + head.bias).float().cpu()
            order += b.tolist()
        # back to the subset's data order (idx is ascending)
        return logits[torch.argsort(torch.tensor(order, dtype=torch.long))], data.labels[idx]

    def _example_grads(self, task, split, n, seed, params, names):
        """Per-example gradients of log p(y|x), on the device, one example at a time."""
        trainable = dict(self.backbone.named_parameters())
        names = list(trainable) if names is None else list(names)
        unknown = [k for k in names if k not in trainable]
        if unknown:
            raise ValidationError(f"{unknown[0]!r} is not a backbone parameter (heads are frozen and have no gradient)")
        given = self._prepare(params) or {}
        data = self._split(task, split)
        for i in self.examples(task, split, n, seed):
            inputs, _ = data.batch(i.view(1))
            leaves = {k: given.get(k, trainable[k]).detach().float().requires_grad_(True) for k in names}
            with torch.enable_grad():
                logits = self.logits(_to(inputs, self.device), task, {**given, **leaves})
                logp = -nn.functional.cross_entropy(logits, data.labels[i].view(1).to(self.device))
                grads = torch.autograd.grad(logp, list(leaves.values()), allow_unused=True)
            yield {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads)}

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
