"""A resident task-vector set: a slider move (a merge) reads and checks nothing,
and no merging method writes into the kept tensors."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis.merging import METHODS, merge, unavailable
from analysis.taskvectors import TaskVectorSet


@pytest.fixture()
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"encoder.layer.{i}.dense.weight": torch.randn(12, 10, generator=g) for i in range(2)}
    base.update({f"encoder.layer.{i}.dense.bias": torch.randn(12, generator=g) for i in range(2)})
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for t in ("a", "b", "c"):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"{t}.safetensors")
        tasks[t] = tmp_path / f"{t}.safetensors"
    return tmp_path / "base.safetensors", tasks


def reads_per_merge(tvs, method="task_arithmetic", **knobs):
    before = tvs.reads
    merge(tvs, method, device="cpu", **knobs)
    return tvs.reads - before


def test_a_second_merge_reads_nothing(files):
    streaming = TaskVectorSet.from_checkpoints(*files)
    resident = TaskVectorSet.from_checkpoints(*files)
    resident.keep_resident("cpu")
    n = len(streaming.param_names) * (1 + len(streaming.tasks))
    assert reads_per_merge(streaming, alpha=0.3) == n and reads_per_merge(streaming, alpha=0.5) == n
    assert reads_per_merge(resident, alpha=0.3) == n and reads_per_merge(resident, alpha=0.5) == 0
    a = merge(streaming, "task_arithmetic", alpha=0.5, device="cpu")
    b = merge(resident, "task_arithmetic", alpha=0.5, device="cpu")
    for name in streaming.param_names:
        assert torch.equal(a[name], b[name])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_writes_into_the_resident_deltas(files, method):
    tvs = TaskVectorSet.from_checkpoints(*files)
    tvs.keep_resident("cpu")
    if method == "slerp":
        tvs = tvs.subset(["a", "c"])
    if unavailable(method, len(tvs.tasks), has_data=False):
        pytest.skip(unavailable(method, len(tvs.tasks), has_data=False))
    kept = {n: tvs.deltas(n).clone() for n in tvs.param_names}
    merge(tvs, method, device="cpu")
    for n in tvs.param_names:
        assert torch.equal(tvs.deltas(n), kept[n]), f"{method} modified the resident deltas of {n}"


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv_m", "iso_cts"])
def test_alpha_one_shares_the_kept_merge_and_no_consumer_writes_into_it(files, method):
    """At α = 1 the result is the memo's own unscaled merge (no model-sized copy per move), so every
    consumer of a MergeResult must leave it as it is: scoring, export, landscape paths."""
    from analysis.landscape import delta_path, scale_delta
    from analysis.merging import MergeInputs
    from analysis.report import merged_model

    tvs = TaskVectorSet.from_checkpoints(*files)
    tvs.keep_resident("cpu")
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    one = merge(inputs, method, alpha=1.0)
    half = merge(inputs, method, alpha=0.5)
    matrix = "encoder.layer.0.dense.weight"
    assert merge(inputs, method, alpha=1.0)[matrix].data_ptr() == one[matrix].data_ptr()   # shared, not copied
    kept = {n: one[n].clone() for n in tvs.param_names}
    for n in tvs.param_names:
        torch.testing.assert_close(half[n], 0.5 * kept[n], rtol=0, atol=0)
    base = {n: tvs.base_tensor(n) for n in tvs.param_names}
    tvs.apply(one)
    scale_delta(base, one, 2.0)
    tidy = lambda params: pd.DataFrame({"task": ["a"], "metric": ["loss"], "value": [0.0]})   # noqa: E731
    delta_path(tidy, base, one, half, lambdas=[0.0, 1.0])
    delta_path(tidy, base, one, {}, lambdas=[0.5, 1.0])
    merged_model(tvs, one)(lambda name, tensor: None)   # the export's stream
    for n in tvs.param_names:
        assert torch.equal(one[n], kept[n]), f"a consumer wrote into {method}'s kept merge of {n}"
