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
    Both compute chunks of examples at once with torch.func.vmap where the backbone
    allows it (checked once against the one-example loop, which stays the fallback;
    `Evaluator(fast_grads=False)` forces the loop); results agree to float32 rounding.
"""
from __future__ import annotations

import copy
import logging
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from analysis.device import get_device
from analysis.errors import ValidationError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
COLUMNS = ["task", "metric", "value", "split", "n"]
_log = logging.getLogger(__name__)
# Scoring batches on a CPU: compute there grows with padded tokens, so smaller length-sorted batches
# waste less. Quick demo, 8 tasks × 64 validation examples: 5.0 s at 128 per batch, 3.6 s at 32, 3.2 s at 16.
SCORE_BATCH_CPU = 16


class ScoringStopped(Exception):
    """Raised by scoring when its `stop()` says a newer request replaced this one (a background refinement
    or speculation whose slider has moved on). Polled before every forward batch and before every module
    of its forward, so the scoring gives the backbone and the CPU back within one module's work. Between
    batches only, a refinement on 128 examples per task (its longest batches first) went on for 0.36–0.78 s
    after a Loss Landscape move, and the move's own first estimate waited that long for the backbone."""


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise ScoringStopped("a newer request replaced this scoring")


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


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def backbone_lock(backbone: nn.Module) -> threading.RLock:
    """The one re-entrant lock of a backbone module.

    `functional_call` swaps tensors into the module's attributes for the length of
    a forward, and forward hooks are module state, so two threads running the
    same module (a page and its session's background refinement, two sessions
    sharing a cached workspace) would see each other's parameters: they take
    turns. Kept beside the module, not on it, so the module still deep-copies."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(backbone)
        if lock is None:
            lock = _LOCKS[backbone] = threading.RLock()
        return lock


def features(backbone: nn.Module, inputs: Inputs, params: Mapping[str, torch.Tensor] | None = None,
             stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Pooled backbone features (B, H) of one batch.

    `inputs` is a dict of keyword arguments or one tensor passed positionally.
    With `params`, those tensors replace the module's own (functional_call).
    An output with a sequence dimension (HF output, tuple or 3-D tensor) is
    mean-pooled over the inputs' attention_mask (all positions when there is
    none); a 2-D output is already pooled and returned as is.
    `stop`: polled before every module's forward (`ScoringStopped`; the module's own tensors are back
    in place when it propagates).
    """
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    with backbone_lock(backbone):
        # hooks are module state: added and removed under the lock, so no other forward sees them
        hooks = [] if stop is None else [m.register_forward_pre_hook(lambda *_: _check_stop(stop))
                                         for m in backbone.modules()]
        try:
            if params:
                out = functional_call(backbone, dict(params), args=args, kwargs=kwargs, strict=False)
            else:
                out = backbone(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
    return _pool_output(out, kwargs.get("attention_mask"))


def _pool_output(out, mask: torch.Tensor | None) -> torch.Tensor:
    """`features`' pooling of a backbone output: (B, H) as is, token states mean-pooled over `mask`."""
    if hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
    elif isinstance(out, torch.Tensor):
        hidden = out
    else:
        hidden = out[0]
    if hidden.dim() == 2:
        return hidden
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
                 batch_size: int = 128, subsample_seed: int = 0, fast_grads: bool = True,
                 grad_chunk_bytes: int = 512 * 2**20):
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
        # The base tensors, read once: while a forward runs, functional_call has another thread's
        # tensors in the module's attributes, so state_dict() then would not be the base.
        self._base = dict(self.backbone.state_dict(keep_vars=False))
        self._trainable = [k for k, _ in self.backbone.named_parameters()]
        self._shapes = {k: tuple(v.shape) for k, v in self._base.items()}
        # per-example gradients (per_example_grads, fisher_diagonal): vmap over chunks of
        # examples where the backbone allows it, else one example at a time
        self.fast_grads = bool(fast_grads)
        self.grad_chunk_bytes = int(grad_chunk_bytes)
        self._grad_routes: dict[tuple, _GradRoute | None] = {}  # per data kind and names, decided on first use

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def split_size(self, task: str, split: str) -> int:
        return len(self._split(task, split))

    def backbone_copy(self) -> nn.Module:
        """A deep copy of the base backbone (to train or modify), taken while no other thread's forward
        has its tensors swapped in."""
        with backbone_lock(self.backbone):
            return copy.deepcopy(self.backbone)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self._base.items()}

    # ------------------------------------------------------------ scoring
    def evaluate(self, params: Mapping[str, torch.Tensor] | nn.Module | None = None, split: str = "validation",
                 subsample: int | None = None, tasks: Sequence[str] | None = None,
                 stop: Callable[[], bool] | None = None) -> pd.DataFrame:
        """Tidy table (task, metric in {accuracy, loss}, value, split, n).

        `params` is a full or partial backbone state dict (missing tensors come
        from the base), a module with such a state dict, or None for the base.
        `subsample=n` scores a fixed, seeded subset of n examples per task.
        `stop`: polled before every forward batch and every module of its forward (`features`);
        `ScoringStopped` when it returns True.
        """
        split = canonical_split(split)
        prepared = self._prepare(params)
        rows = []
        tasks = self._tasks(tasks)
        together = self._logits_of_tasks(tasks, split, prepared, subsample, stop)
        for task in tasks:
            acc, loss, n = self._score(task, split, prepared, subsample, together.get(task), stop)
            rows.append({"task": task, "metric": "accuracy", "value": acc, "split": split, "n": n})
            rows.append({"task": task, "metric": "loss", "value": loss, "split": split, "n": n})
        return pd.DataFrame(rows, columns=COLUMNS)

    def evaluate_delta(self, delta: Mapping[str, torch.Tensor], alpha: float = 1.0, split: str = "validation",
                       subsample: int | None = None, tasks: Sequence[str] | None = None,
                       stop: Callable[[], bool] | None = None) -> pd.DataFrame:
        """Score base + alpha * delta (delta: parameter name -> tensor)."""
        base = self._base
        params = {}
        for name, d in delta.items():
            if name not in base:
                raise ValidationError(f"delta holds {name!r}, which is not a backbone parameter")
            if tuple(d.shape) != tuple(base[name].shape):
                raise ValidationError(f"delta for {name!r} has shape {tuple(d.shape)}, the backbone has {tuple(base[name].shape)}")
            params[name] = base[name] + float(alpha) * d.to(self.device, base[name].dtype)
        return self.evaluate(params, split=split, subsample=subsample, tasks=tasks, stop=stop)

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
        with backbone_lock(self.backbone):   # hooks are module state: no other thread's forward sees them
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
        heads are frozen and never differentiated. Computed a chunk of examples
        at a time where the backbone allows it (see `_grad_chunks`).
        """
        for chunk in self._grad_chunks(task, split, n, seed, params, names, in_order=True):
            for j in range(chunk.size):
                yield {k: chunk.example(k, j).float().cpu() for k in chunk.names}

    def fisher_diagonal(self, task: str, split: str = "train", n: int | None = 256, seed: int = 0,
                        params: Mapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None
                        ) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher: mean over the examples of (d log p(y|x) / d param)^2, true labels."""
        total, count = None, 0
        for chunk in self._grad_chunks(task, split, n, seed, params, names, in_order=False):
            if total is None:
                total = {k: torch.zeros(chunk.shapes[k], dtype=torch.float32, device=self.device) for k in chunk.names}
            chunk.add_squares(total)
            count += chunk.size
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

    def _score_batch_size(self) -> int:
        """Examples per scoring forward: at most SCORE_BATCH_CPU on a CPU, where padding costs as much as
        tokens (module constant's note); `batch_size` elsewhere."""
        return min(self.batch_size, SCORE_BATCH_CPU) if self.device.type == "cpu" else self.batch_size

    @torch.no_grad()
    def _logits_of_tasks(self, tasks, split, params, subsample, stop=None) -> dict:
        """{task: (logits, labels)} of several token-data tasks scored with the same parameters, their
        examples pooled and length-sorted across tasks, so short examples of one task share batches with
        short ones of another (less padding than task by task). Empty when there is one task or any split
        is not token data (a task then takes `_logits`). Each example's logits come from its own task's
        head; only the batch it rides in differs, which changes float32 rounding, not the result."""
        splits = [self._split(t, split) for t in tasks]
        if len(tasks) < 2 or not all(isinstance(d, EncodedSplit) for d in splits):
            return {}
        idx = [self._indices(len(d), subsample) for d in splits]
        owner = torch.cat([torch.full((len(i),), k, dtype=torch.long) for k, i in enumerate(idx)])
        row = torch.cat(idx)
        lengths = torch.cat([d.lengths()[i] for d, i in zip(splits, idx)])
        order = torch.argsort(lengths, descending=True, stable=True)
        feats = [torch.empty(len(i), self.heads[t].weight.shape[1], device=self.device) for t, i in zip(tasks, idx)]
        where = torch.cat([torch.arange(len(i)) for i in idx])      # position in its task's subset
        size = self._score_batch_size()
        for start in range(0, len(order), size):
            _check_stop(stop)
            b = order[start:start + size]
            width = int(lengths[b].max())
            ids = torch.zeros(len(b), width, dtype=splits[0].input_ids.dtype)
            mask = torch.zeros(len(b), width, dtype=splits[0].attention_mask.dtype)
            for j, e in enumerate(b.tolist()):
                d, r, w = splits[int(owner[e])], int(row[e]), min(width, splits[int(owner[e])].input_ids.shape[1])
                ids[j, :w] = d.input_ids[r, :w]
                mask[j, :w] = d.attention_mask[r, :w]
            f = features(self.backbone, {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)},
                         params, stop)
            for j, e in enumerate(b.tolist()):
                feats[int(owner[e])][int(where[e])] = f[j]
        out = {}
        for k, task in enumerate(tasks):
            head = self.heads[task]
            out[task] = ((feats[k] @ head.weight.T + head.bias).float().cpu(), splits[k].labels[idx[k]])
        return out

    @torch.no_grad()
    def _logits(self, task, split, params, subsample, stop=None):
        data = self._split(task, split)
        idx = self._indices(len(data), subsample)
        head = self.heads[task]
        logits = torch.empty(len(idx), head.weight.shape[0])
        order = []
        for b, inputs, _, _ in self._batches(task, split, idx, self._score_batch_size()):
            _check_stop(stop)
            feats = features(self.backbone, inputs, params, stop)
            logits[len(order):len(order) + len(b)] = (feats @ head.weight.T + head.bias).float().cpu()
            order += b.tolist()
        # back to the subset's data order (idx is ascending)
        return logits[torch.argsort(torch.tensor(order, dtype=torch.long))], data.labels[idx]

    # ------------------------------------------------------------ per-example gradients
    def _grad_chunks(self, task, split, n, seed, params, names, in_order):
        """Per-example gradients of log p(y|x) on the device, as `_GradChunk`s of the examples of
        `examples(...)`: in that order (`in_order`) or longest first (less padding; for sums).

        Route: `torch.func.vmap(grad(...))` over a chunk of examples padded to a common width
        (`_vmap_chunk`), at most `grad_chunk_bytes` of per-example gradients at a time; a
        token embedding's gradient stays as its per-token rows (no dense vocabulary-sized
        tensor per example) and an nn.Linear weight's as δᵀx. Whether a backbone can take
        that route is checked once per evaluator, kind of data and names against the
        one-example loop (`_grad_route`); where it cannot (data-dependent control flow,
        padding that changes the answer, any error) or `fast_grads` is False, examples go
        one at a time (`_loop_chunk`), also for the rest of a call whose chunk failed.
        """
        names, values, given = self._grad_leaves(names, params)
        data = self._split(task, split)
        idx = self.examples(task, split, n, seed)
        if not in_order:
            idx = idx[torch.argsort(data.lengths()[idx], descending=True, stable=True)]
        with backbone_lock(self.backbone):
            route = self._grad_route(task, data, idx, values, given, names) if self.fast_grads and len(idx) else None
        if route is not None:
            size = self._chunk_size(data, values, names, route)
            for start in range(0, len(idx), size):
                b = idx[start:start + size]
                inputs, _ = data.batch(b)
                try:
                    with backbone_lock(self.backbone):   # a chunk at a time, never across a yield
                        chunk = self._vmap_chunk(task, _to(inputs, self.device), data.labels[b].to(self.device),
                                                 values, given, names, route)
                except Exception as err:  # noqa: BLE001 -- any failure: the loop computes the rest
                    self._grad_routes[_route_key(data, names)] = None
                    _log.info("per-example gradients fall back to the one-example loop: %s: %s",
                              type(err).__name__, err)
                    idx = idx[start:]
                    break
                yield chunk
            else:
                return
        for i in idx:
            yield self._loop_chunk(task, data, i, values, given, names)

    def _grad_leaves(self, names, params):
        """(names, {name: float32 value at `params`}, prepared params) of a gradient request."""
        trainable = {k: self._base[k] for k in self._trainable}
        names = list(trainable) if names is None else list(names)
        unknown = [k for k in names if k not in trainable]
        if unknown:
            raise ValidationError(f"{unknown[0]!r} is not a backbone parameter (heads are frozen and have no gradient)")
        given = self._prepare(params) or {}
        return names, {k: given.get(k, trainable[k]).detach().float() for k in names}, given

    def _loop_chunk(self, task, data, i, values, given, names) -> "_GradChunk":
        """One example, alone at its own length, through autograd: the reference route."""
        inputs, _ = data.batch(i.view(1))
        leaves = {k: values[k].detach().requires_grad_(True) for k in names}
        with torch.enable_grad():
            logits = self.logits(_to(inputs, self.device), task, {**given, **leaves})
            logp = -nn.functional.cross_entropy(logits, data.labels[i].view(1).to(self.device))
            grads = torch.autograd.grad(logp, list(leaves.values()), allow_unused=True)
        dense = {k: (torch.zeros_like(leaves[k]) if g is None else g).unsqueeze(0) for k, g in zip(names, grads)}
        return _GradChunk(names, {k: tuple(values[k].shape) for k in names}, dense)

    def _vmap_chunk(self, task, inputs, labels, values, given, names, route) -> "_GradChunk":
        """Per-example gradients of a padded chunk: vmap over examples of the one-example
        gradient, each example seen by the backbone as a batch of one (padding masked out).

        With `route.linears`, an nn.Linear's weight is not differentiated inside vmap (its
        per-example gradient would be a batched matmul, slow on CPUs): a zero added to the
        layer's output gives the output gradient δ per example and the layer's input x
        comes back as aux, so the weight's per-example gradient is δᵀx (summed over
        tokens), formed example by example outside vmap (`_GradChunk`).
        """
        head = self.heads[task]
        row_mods = {m: w for m, w in route.rows.items() if w in names}
        lin_mods = ({m: w for m, w in self._plain_linears().items() if w in names and m not in row_mods}
                    if route.linears else {})
        ids = inputs["input_ids"] if row_mods else None
        rows = {w: values[w][ids] for w in row_mods.values()}  # (B, L, H): the rows each token looks up

        def call(inputs):  # one example as a batch of one: (args, kwargs, 2-D mask or None)
            if isinstance(inputs, Mapping):
                kwargs = {k: v.unsqueeze(0) for k, v in inputs.items()}
                mask = kwargs.get("attention_mask")
                if route.mask == "4d" and mask is not None:
                    kwargs["attention_mask"] = _additive_mask(mask)
                return (), kwargs, mask
            return (inputs.unsqueeze(0),), {}, None

        shapes: dict[str, torch.Size] = {}
        if lin_mods:  # the zero added to each layer's output needs its per-example shape
            def record(m):
                def hook(module, args, output):
                    shapes[m] = output.shape
                return hook
            args, kwargs, _ = call(_index(inputs, 0))
            with torch.no_grad(), self.hooked({m: record(m) for m in lin_mods}):
                functional_call(self.backbone, given, args=args, kwargs=kwargs, strict=False)
            lin_mods = {m: w for m, w in lin_mods.items() if m in shapes}  # a layer never reached: in vmap (zeros)
        probes = {m: torch.zeros(shapes[m], device=self.device) for m in lin_mods}
        diff = {k: values[k] for k in names if k not in rows and k not in lin_mods.values()}
        state: dict = {}

        def substitute_rows(weight):
            def hook(module, args, output):
                if state and args and args[0] is state["ids"]:
                    state["hits"][weight] += 1
                    return state["rows"][weight].unsqueeze(0)
            return hook

        def open_output(m):
            def hook(module, args, output):
                if state:
                    if m in state["inputs"] or output.shape != state["probes"][m].shape:
                        raise RuntimeError(f"{m} is called more than once or with another shape")
                    state["inputs"][m] = args[0]
                    return output + state["probes"][m]
            return hook

        def log_p(diff, rows, probes, inputs, label):
            args, kwargs, mask = call(inputs)
            state.update(ids=kwargs.get("input_ids"), rows=rows, hits=dict.fromkeys(rows, 0), probes=probes,
                         inputs={})
            try:
                out = functional_call(self.backbone, {**given, **diff}, args=args, kwargs=kwargs, strict=False)
                if any(h != 1 for h in state["hits"].values()) or len(state["inputs"]) != len(probes):
                    raise RuntimeError(f"token embeddings looked up {state['hits']} times (once each expected), "
                                       f"{len(state['inputs'])} of {len(probes)} linear layers reached")
                layer_inputs = state["inputs"]
            finally:
                state.clear()
            logits = _pool_output(out, mask) @ head.weight.T + head.bias
            return -nn.functional.cross_entropy(logits, label.view(1)), layer_inputs

        hooks = {**{m: substitute_rows(w) for m, w in row_mods.items()}, **{m: open_output(m) for m in lin_mods}}
        with warnings.catch_warnings(), self.hooked(hooks):
            # ops without a batching rule still run (looped inside vmap); the warning is noise here
            warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented")
            (dense, row_grads, deltas), layer_inputs = vmap(
                grad(log_p, argnums=(0, 1, 2), has_aux=True), in_dims=(None, 0, None, 0, 0))(
                diff, rows, probes, inputs, labels)
        out_rows = {}
        for m, w in row_mods.items():
            keep = inputs["attention_mask"] != 0
            pad = self.backbone.get_submodule(m).padding_idx
            if pad is not None:
                keep = keep & (ids != pad)  # nn.Embedding gives its padding row no gradient
            out_rows[w] = (ids, keep, row_grads[w])
        outer = {w: (layer_inputs[m], deltas[m]) for m, w in lin_mods.items()}
        return _GradChunk(names, {k: tuple(values[k].shape) for k in names}, dense, out_rows, outer,
                          int(labels.shape[0]))

    def _plain_linears(self) -> dict[str, str]:
        """{module name: weight name} of the backbone's nn.Linear modules (exactly that class)."""
        return {m: f"{m}.weight" if m else "weight" for m, mod in self.backbone.named_modules()
                if type(mod) is nn.Linear}

    def _chunk_size(self, data, values, names, route) -> int:
        """Examples per vmap chunk, at most `batch_size`: about `grad_chunk_bytes` of per-example
        float32 tensors (gradients, rows, a linear layer's input and output gradient), doubled
        for the activations autograd keeps."""
        rows = {w for w in route.rows.values() if w in names}
        lin = set(self._plain_linears().values()) - rows if route.linears else set()
        width = int(data.input_ids.shape[1]) if isinstance(data, EncodedSplit) else 1
        floats = sum(width * values[k].shape[-1] if k in rows else
                     width * sum(values[k].shape) if k in lin else values[k].numel() for k in names)
        return max(1, min(self.batch_size, int(self.grad_chunk_bytes // (8 * max(floats, 1)))))

    def _grad_route(self, task, data, idx, values, given, names):
        """How this backbone computes per-example gradients of this kind of data and these
        parameters (decided once per evaluator): a `_GradRoute` for `_vmap_chunk`, or None for
        the one-example loop.

        Candidates, fastest first (token data: the 2-D attention mask as given, then as a
        prepared 4-D additive mask; token-embedding rows or not; nn.Linear weights as δᵀx or
        inside vmap) compute the gradient of the shortest example padded to the split's
        full width; the first that raises nothing and matches the loop's gradient of that
        example at its own length to 1e-3 is taken (float32 rounding is ~1e-6; a padding
        leak or a missed parameter is ~1).
        """
        key = _route_key(data, names)
        if key in self._grad_routes:
            return self._grad_routes[key]
        i = idx[int(torch.argmin(data.lengths()[idx]))]
        ref = self._loop_chunk(task, data, i, values, given, names)
        if isinstance(data, EncodedSplit):
            inputs = {"input_ids": data.input_ids[i].view(1, -1), "attention_mask": data.attention_mask[i].view(1, -1)}
            embeddings = {m: w for m, w in self._token_embeddings(_to(data.batch(i.view(1))[0], self.device),
                                                                  given).items() if w in names}
            masks = ("2d", "4d")
        else:
            inputs, embeddings, masks = data.batch(i.view(1))[0], {}, (None,)
        linears = [True, False] if set(self._plain_linears().values()) & set(names) else [False]
        candidates = [_GradRoute(mask, rows, lin) for mask in masks for rows in ([embeddings, {}] if embeddings else [{}])
                      for lin in linears]
        inputs, label = _to(inputs, self.device), data.labels[i].view(1).to(self.device)
        reasons, route = [], None
        for cand in candidates:
            try:
                bad = _first_mismatch(self._vmap_chunk(task, inputs, label, values, given, names, cand), ref)
            except Exception as err:  # noqa: BLE001 -- a backbone vmap cannot batch
                bad = f"{type(err).__name__}: {err}"
            if bad is None:
                route = cand
                break
            reasons.append(f"{cand}: {bad}")
        if route is None:
            _log.info("per-example gradients of %s data use the one-example loop; vmap: %s", key[0], "; ".join(reasons))
        self._grad_routes[key] = route
        return route

    def _token_embeddings(self, inputs, given) -> dict[str, str]:
        """{module name: weight name} of the plain nn.Embedding modules that look up `input_ids`."""
        plain = {m: f"{m}.weight" for m, mod in self.backbone.named_modules()
                 if isinstance(mod, nn.Embedding) and mod.max_norm is None
                 and not mod.scale_grad_by_freq and not mod.sparse}
        seen = []

        def record(m):
            def hook(module, args, output):
                if args and args[0] is inputs.get("input_ids"):
                    seen.append(m)
            return hook

        with torch.no_grad(), self.hooked({m: record(m) for m in plain}):
            features(self.backbone, inputs, given)
        return {m: plain[m] for m in plain if seen.count(m) == 1}

    def _score(self, task, split, params, subsample, logits_labels=None, stop=None):
        logits, labels = (logits_labels if logits_labels is not None
                          else self._logits(task, split, params, subsample, stop))
        if len(labels) == 0:
            return float("nan"), float("nan"), 0
        acc = float((logits.argmax(1) == labels).float().mean())
        loss = float(nn.functional.cross_entropy(logits, labels))
        return acc, loss, int(len(labels))


# ---------------------------------------------------------------- per-example gradient helpers
@dataclass(frozen=True)
class _GradRoute:
    """How `_vmap_chunk` calls the backbone: `mask` "2d" (as given) or "4d" (additive bias),
    None for feature data; `rows`: {module: weight} of token embeddings differentiated per
    row; `linears`: nn.Linear weights as δᵀx outside vmap."""

    mask: str | None
    rows: Mapping[str, str]
    linears: bool = False

    def __str__(self) -> str:
        return (f"vmap(mask={self.mask}, rows={sorted(self.rows.values())}, "
                f"linear weights={'δᵀx' if self.linears else 'in vmap'})")


@dataclass
class _GradChunk:
    """Per-example gradients of `size` examples, each kind kept in its cheapest form:
    `dense[name]` (size, *shape); for a token embedding `rows[name]` = (ids (size, L),
    keep (size, L), grads (size, L, H)): the example's gradient is its kept rows summed by
    id; for an nn.Linear weight `outer[name]` = (x (size, ..., in), δ (size, ..., out)):
    the example's gradient is δᵀx summed over its leading dimensions (tokens)."""

    names: list[str]
    shapes: dict[str, tuple]
    dense: dict[str, torch.Tensor]
    rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    outer: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    size: int = 1

    def example(self, name: str, j: int) -> torch.Tensor:
        """Example j's gradient of `name`, dense."""
        if name in self.dense:
            return self.dense[name][j]
        if name in self.outer:
            x, d = self.outer[name]
            return d[j].reshape(-1, d.shape[-1]).T @ x[j].reshape(-1, x.shape[-1])
        ids, keep, g = self.rows[name]
        out = torch.zeros(self.shapes[name], dtype=g.dtype, device=g.device)
        return out.index_add_(0, ids[j][keep[j]], g[j][keep[j]])

    def add_squares(self, total: dict[str, torch.Tensor]) -> None:
        """total[name] += Σ_examples gradient², in place."""
        for k, g in self.dense.items():
            for j in range(self.size):
                total[k].addcmul_(g[j], g[j])
        for k, (x, d) in self.outer.items():
            buf = torch.empty(self.shapes[k], dtype=total[k].dtype, device=total[k].device)
            for j in range(self.size):
                torch.mm(d[j].reshape(-1, d.shape[-1]).T, x[j].reshape(-1, x.shape[-1]), out=buf)
                total[k].addcmul_(buf, buf)
        for k, (ids, keep, g) in self.rows.items():
            g = g.float()
            # each kept token's row gradient = the sum over the example's tokens of the same id,
            # squared once per (example, id): at the id's first kept token
            same = (ids[:, :, None] == ids[:, None, :]) & keep[:, :, None] & keep[:, None, :]
            summed = torch.bmm(same.to(g.dtype), g)
            earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
            first = keep & ~(same & earlier).any(-1)
            total[k].index_add_(0, ids[first], summed[first] ** 2)


def _route_key(data: Split, names: Sequence[str]) -> tuple:
    """What a route check covers: the kind of data and the parameters differentiated."""
    return type(data).__name__, tuple(names)


def _index(inputs: Inputs, j: int) -> Inputs:
    """Example j of a batch (dict of tensors or one tensor), without its batch dimension."""
    if isinstance(inputs, Mapping):
        return {k: v[j] for k, v in inputs.items()}
    return inputs[j]


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 attention mask -> (B, 1, L, L) float32 additive bias (0 kept, the float32
    minimum at padding), the prepared 4-D mask transformers' attention takes as is (its
    2-D mask path inspects the mask's values, which vmap cannot batch)."""
    width = mask.shape[-1]
    bias = torch.zeros(mask.shape[0], 1, 1, width, device=mask.device)
    bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    return bias.expand(-1, 1, width, width)


def _first_mismatch(fast: _GradChunk, ref: _GradChunk, tol: float = 1e-3) -> str | None:
    """None when every gradient of example 0 agrees to `tol` relative (a tensor's error against
    its own norm, floored at 1% of the largest norm: some gradients are zero up to rounding)."""
    refs = {k: ref.example(k, 0).float() for k in ref.names}
    scale = max((float(v.norm()) for v in refs.values()), default=0.0)
    for k, r in refs.items():
        err = float((fast.example(k, 0).float() - r).norm())
        if not err <= tol * max(float(r.norm()), 1e-2 * scale):
            return f"{k!r} differs from the loop by {err:.3g} (norm {float(r.norm()):.3g})"
    return None


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
