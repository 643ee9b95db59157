"""A resident task-vector set: a slider move (a merge) reads and checks nothing,
and no merging method writes into the kept tensors."""
from __future__ import annotations

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
