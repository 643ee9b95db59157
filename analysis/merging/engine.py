"""The merge engine: it owns the loop over parameters, so methods don't.

`run(method, inputs, params)`:
1. calls the method's optional whole-model `prepare` pass (its result is
   `ctx.state`);
2. walks the parameters the method covers in groups (one name, or every name
   of one matrix shape) and calls `merge_group(group, params, ctx)`;
3. gives every other parameter the method's `rest` rule (α × mean by default);
4. hands each merged tensor to the sink: kept in a `MergeResult` (default),
   or passed to `sink(name, delta)` as soon as it exists (write to a file,
   move to the CPU, ...), so a large model never has to be held twice.

Peak memory of this layer-by-layer path (a streaming set: not resident,
`TaskVectorSet.keep_resident` declined or not called): the deltas of one
group resident at a time, i.e. T tensors of one parameter (group_by="param"),
or T × the names of one shape group, cut into runs of at most
SHAPE_GROUP_BYTES (group_by="shape"); plus the method's working copies of
that group (a few more of the same size) and what it keeps across groups,
which its `peak_memory` declares (memoised thresholds, bases, the unscaled
merge kept for α changes). With a `sink` nothing else accumulates; without
one the `MergeResult` holds the merged model (T models for per-task methods).
A `prepare` pass streams the model the same way before the loop. A resident
set keeps every (T, *shape) stack on its device by design (it checked they fit).

One result type, `MergeResult`: every method yields one model per task
(`for_task(task)`); methods that merge return the same shared delta for
every task, TSV-C returns each task's own compressed delta. Scoring and
export go through `for_task`/`models()` and need no per-method branch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from analysis.errors import ValidationError
from analysis.merging.base import MergeContext, MergeMethod, mean_rule
from analysis.merging.common import scaled

log = logging.getLogger(__name__)


class MergeStopped(Exception):
    """Raised by `run` between parameter groups when its `stop()` returns True (a background merge of a
    knob value the user has not asked for, overtaken by one they have)."""


Sink = Callable[[str, torch.Tensor], None]   # (name, delta) -> None; delta is (T, *shape) for per-task methods


@dataclass
class ParamGroup:
    """The parameters one `merge_group` call sees (same matrix shape when grouped by shape)."""

    names: list[str]
    inputs: object

    @property
    def tvs(self):
        return self.inputs.tvs

    @property
    def n_tasks(self) -> int:
        return len(self.inputs.tvs.tasks)

    def deltas(self, name: str) -> torch.Tensor:
        """(T, *shape) float32 deltas of one name on the device."""
        return self.inputs.deltas(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inputs.tvs.shape(name)


class MergeResult(Mapping):
    """The merged delta(s) of one method with one set of knobs.

    As a Mapping it is the shared merged delta, {param: tensor}, in the set's
    parameter order. `for_task(task)` is the delta task `task` is scored with
    (the shared one, or the task's own for per-task methods such as TSV-C);
    `models()` lists the distinct models with the tasks each serves.

    Its tensors may be the inputs' own memoised ones (an unscaled merge at α = 1, `common.scaled`; the
    kept task mean or task sum), so a consumer never modifies them in place."""

    def __init__(self, method: str, params: dict, tasks: list[str], shared: dict | None = None,
                 own: dict[str, dict] | None = None):
        if (shared is None) == (own is None):
            raise ValueError("a MergeResult holds either a shared delta or one delta per task")
        self.method, self.params, self.tasks = method, dict(params), list(tasks)
        self._shared, self._own = shared, own

    @property
    def per_task(self) -> bool:
        return self._own is not None

    @property
    def shared(self) -> dict:
        if self._own is not None:
            raise ValidationError(f"{self.method} gives one model per task, not one merged model; "
                                  "use result.for_task(task) or result.models()")
        return self._shared

    def for_task(self, task: str) -> dict:
        if task not in self.tasks:
            raise ValidationError(f"no task named {task!r}; tasks are {self.tasks}")
        return self._shared if self._own is None else self._own[task]

    def models(self) -> list[tuple[list[str], dict]]:
        """[(tasks, delta)]: one entry for a merge, one per task for per-task methods."""
        if self._own is None:
            return [(list(self.tasks), self._shared)]
        return [([t], self._own[t]) for t in self.tasks]

    # Mapping over the shared delta
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.shared[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shared)

    def __len__(self) -> int:
        return len(self.shared)


SHAPE_GROUP_BYTES = 256 << 20   # a shape group's T float32 deltas stay under this (at least one name per group)
# a merge that may be stopped (`run(stop=...)`: a background merge) runs in smaller groups, so a stop lands
# sooner: quick demo Iso-CTS, stop to MergeStopped 0.22–0.56 s in groups of 256 MiB, 0.05–0.12 s in groups of
# 32 MiB, at 1.35 → 1.6 s for the whole merge (2-core CPU; docs/results_live.md)
STOPPABLE_GROUP_BYTES = 32 << 20


def groups(method: MergeMethod, names: list[str], tvs, inputs,
           group_bytes: int | None = None) -> list[ParamGroup]:
    """One name per group, or (group_by="shape") names of one matrix shape
    together, split into runs whose T float32 deltas take at most
    SHAPE_GROUP_BYTES, so batching never makes a group grow with depth (every
    block of a LLaMA shares its shapes)."""
    if method.group_by == "param":
        return [ParamGroup([n], inputs) for n in names]
    by_shape: dict[tuple, list[str]] = {}
    for n in names:
        shape = tvs.shape(n)
        by_shape.setdefault((shape[0], int(math.prod(shape[1:]))), []).append(n)
    n_tasks = len(tvs.tasks)
    group_bytes = SHAPE_GROUP_BYTES if group_bytes is None else group_bytes
    out = []
    for (m, n), same in by_shape.items():
        per_group = max(1, group_bytes // max(1, 4 * n_tasks * m * n))
        out += [ParamGroup(same[i:i + per_group], inputs) for i in range(0, len(same), per_group)]
    return out


def run(method: MergeMethod, inputs, params: dict, *, polar: str = "auto", topk: str = "auto",
        sink: Sink | None = None, stop: Callable[[], bool] | None = None) -> MergeResult | None:
    """Merge `inputs.tvs` with `method` at validated knobs `params` (see module doc).

    With a `sink`, tensors go there as they are made and None is returned. One merge runs at a time per
    inputs (`inputs.merge_lock`: methods share its memo). `stop`, polled before each parameter group
    (shape groups then cut at STOPPABLE_GROUP_BYTES), ends the merge with `MergeStopped` when it returns
    True, or when a merge without one (someone's own request, from any session) is waiting for the lock;
    what finished groups memoised stays valid."""
    lock = getattr(inputs, "merge_lock", None)
    if lock is None:
        return _run(method, inputs, params, polar, topk, sink, stop)
    kind = "requested" if stop is None else "background"
    t0 = time.perf_counter()
    if stop is not None:   # a background merge also gives way to any merge someone waits for
        asked, waiting = stop, inputs.waiting
        stop = lambda: asked() or waiting() > 0   # noqa: E731
    try:
        with inputs.wait_for_merge() if kind == "requested" else nullcontext(), lock:
            out = _run(method, inputs, params, polar, topk, sink, stop)
    except MergeStopped:
        log.info("merge: %s %s stopped after %.3f s (%s)", method.name, _knobs(params), time.perf_counter() - t0, kind)
        raise
    log.info("merge: %s %s in %.3f s (%s)", method.name, _knobs(params), time.perf_counter() - t0, kind)
    return out


def _knobs(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _run(method, inputs, params, polar, topk, sink, stop):
    tvs = inputs.tvs
    cache = inputs.spectra(bool(params.get("include_embeddings", False))) if method.needs.spectra else None
    ctx = MergeContext(device=inputs.device, inputs=inputs, cache=cache, polar=polar, topk=topk, memo=inputs.memo)
    if method.needs.labelled_data or method.needs.activations or method.needs.gradients:
        inputs.require_data(method.name)
    if method.prepare is not None:
        ctx.state = method.prepare(inputs, params, ctx)
    covered = list(tvs.param_names) if method.covers is None else list(method.covers(tvs, params))
    out: dict[str, torch.Tensor] = {}
    emit = sink if sink is not None else out.__setitem__
    cut = None if stop is None else STOPPABLE_GROUP_BYTES
    for group in groups(method, covered, tvs, inputs, cut):
        if stop is not None and stop():
            raise MergeStopped(f"{method.name}: stopped before {group.names[0]}")
        merged = method.merge_group(group, params, ctx)
        for name in group.names:
            emit(name, merged[name])
    covered_set = set(covered)
    for name in tvs.param_names:
        if name not in covered_set:
            if method.rest is mean_rule:   # the mean does not depend on the knobs: kept (resident sets)
                emit(name, scaled(params.get("alpha", 1.0), inputs.task_mean(name)))
            else:
                emit(name, method.rest(inputs.deltas(name), params))
    if sink is not None:
        return None
    ordered = {n: out[n] for n in tvs.param_names}
    if method.per_task:
        own = {t: {n: ordered[n][i] for n in ordered} for i, t in enumerate(tvs.tasks)}
        return MergeResult(method.name, params, tvs.tasks, own=own)
    return MergeResult(method.name, params, tvs.tasks, shared=ordered)
