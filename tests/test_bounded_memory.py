"""The layer-by-layer path holds a bounded number of tensors: shape groups are
cut into runs under a byte budget (same merge), and every method that keeps
something across groups declares it in `peak_memory`."""
from __future__ import annotations

import inspect

import torch

import analysis.merging.engine as engine
from analysis.merging import METHODS, MergeInputs, merge
from analysis.merging.base import MergeMethod
from analysis.taskvectors import TaskVectorSet

T = 3


def _set() -> TaskVectorSet:
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.attn.weight": torch.randn(12, 10, generator=g) for i in range(5)}
    base.update({f"blocks.{i}.mlp.weight": torch.randn(8, 12, generator=g) for i in range(2)})
    base["norm.bias"] = torch.randn(8, generator=g)
    return TaskVectorSet.from_state_dicts(base, {f"t{t}": {k: v + torch.randn(v.shape, generator=g)
                                                           for k, v in base.items()} for t in range(T)})


def test_shape_groups_are_cut_into_runs_under_the_budget_with_the_same_merge(monkeypatch):
    tvs = _set()
    whole = merge(MergeInputs(tvs, device="cpu", persist=False), "tsv_m", rank_fraction=0.2)
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    names = METHODS["tsv_m"].covers(tvs, {})
    assert [len(g.names) for g in engine.groups(METHODS["tsv_m"], names, tvs, inputs)] == [5, 2]
    monkeypatch.setattr(engine, "SHAPE_GROUP_BYTES", 2 * 4 * T * 12 * 10)   # two 12x10 parameters' T deltas
    runs = engine.groups(METHODS["tsv_m"], names, tvs, inputs)
    assert [g.names for g in runs] == [["blocks.0.attn.weight", "blocks.1.attn.weight"],
                                       ["blocks.2.attn.weight", "blocks.3.attn.weight"],
                                       ["blocks.4.attn.weight"], ["blocks.0.mlp.weight", "blocks.1.mlp.weight"]]
    split = merge(inputs, "tsv_m", rank_fraction=0.2)
    for name in tvs.param_names:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


def _keeps_state_across_groups(spec: MergeMethod) -> bool:
    source = inspect.getsource(inspect.getmodule(spec.merge_group))
    own = inspect.getsource(spec.merge_group)   # MergeInputs.task_sum / task_mean: kept for resident sets
    return spec.prepare is not None or "unscaled_slot(" in source or "ctx.memo[" in source or "ctx.inputs.task_" in own


def test_every_method_that_keeps_state_across_groups_declares_its_memory():
    default = MergeMethod.__dataclass_fields__["peak_memory"].default
    keeping = [name for name, spec in METHODS.items() if _keeps_state_across_groups(spec)]
    assert {"ties", "dare", "lines", "knots", "tsv_m", "iso_cts", "cart", "wudi", "epimer",
            "task_arithmetic"} <= set(keeping)
    undeclared = [name for name in keeping if METHODS[name].peak_memory == default]
    assert not undeclared, f"methods keeping state across groups without a peak_memory declaration: {undeclared}"
    assert all("T × N" not in spec.peak_memory for spec in METHODS.values())   # no whole-model concatenation left
