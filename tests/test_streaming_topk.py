"""The whole-model top-k threshold of TIES (and of DARE, LiNeS, KnOTS on TIES)
is found by a streaming radix selection: the same threshold, bit for bit, and
so the same kept set, as `kthvalue` of the concatenated magnitudes, which the
old code built (T × N floats at once)."""
from __future__ import annotations

import pytest
import torch

import analysis.merging.dare as dare
import analysis.merging.knots as knots
import analysis.merging.lines as lines
import analysis.merging.ties as ties
from analysis.errors import ValidationError
from analysis.merging import MergeInputs, merge
from analysis.merging.topk import streaming_thresholds
from analysis.taskvectors import TaskVectorSet

DENSITIES = (1e-4, 0.2, 0.731, 1.0)


def concatenated(get, names, n_tasks, k):
    """The old implementation: every task's magnitudes concatenated, then kthvalue."""
    flat = torch.cat([get(n).abs().reshape(n_tasks, -1) for n in names], dim=1)
    return ties.topk_thresholds(flat, k)


def _check(deltas: dict, n_tasks: int, densities=DENSITIES):
    for k in densities:
        ref = concatenated(deltas.__getitem__, list(deltas), n_tasks, k)
        got = streaming_thresholds(deltas.__getitem__, list(deltas), n_tasks, k)
        assert got.dtype == ref.dtype and torch.equal(got, ref), (k, got, ref)
        flat = torch.cat([deltas[n].abs().reshape(n_tasks, -1) for n in deltas], dim=1)
        assert torch.equal(flat >= got[:, None], flat >= ref[:, None])          # the kept set, ties included


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_random_models_give_the_concatenated_threshold(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n_tasks = 1 + seed % 4
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (16, 9)]
    scales = [10.0 ** int(torch.randint(-8, 4, (1,), generator=g)) for _ in shapes]   # magnitudes far apart
    deltas = {f"p{i}": (torch.randn(n_tasks, *s, generator=g) * c).to(dtype) for i, (s, c) in
              enumerate(zip(shapes, scales))}
    _check(deltas, n_tasks)


def test_many_ties_zeros_and_signed_zeros():
    n_tasks = 3
    g = torch.Generator().manual_seed(1)
    deltas = {
        "ints": torch.randint(-2, 3, (n_tasks, 40, 10), generator=g).float(),    # five values: ties everywhere
        "zeros": torch.zeros(n_tasks, 25),                                       # a tensor of zeros
        "minus_zero": -torch.zeros(n_tasks, 6),                                  # -0.0 counts as 0
        "tiny": torch.full((n_tasks, 4), torch.finfo(torch.float32).tiny / 8),   # subnormals
        "one": torch.ones(n_tasks, 1),
    }
    _check(deltas, n_tasks, densities=DENSITIES + (0.4, 0.41, 0.6))
    # with 400 + 36 entries per task, density 0.5 keeps 218: the threshold is a tied value (1) and every
    # entry equal to it is kept, so more than 218 survive, exactly as with the concatenation
    thr = streaming_thresholds(deltas.__getitem__, list(deltas), n_tasks, 0.5)
    flat = torch.cat([d.abs().reshape(n_tasks, -1) for d in deltas.values()], dim=1)
    assert torch.equal(thr, torch.ones(n_tasks)) and bool(((flat >= thr[:, None]).sum(1) > 218).all())


def test_an_all_zero_model_keeps_everything_at_threshold_zero():
    deltas = {"a": torch.zeros(2, 5, 5), "b": -torch.zeros(2, 3)}
    _check(deltas, 2)
    assert torch.equal(streaming_thresholds(deltas.__getitem__, ["a", "b"], 2, 0.2), torch.zeros(2))


def test_a_model_with_no_entries_or_mixed_dtypes_is_refused():
    with pytest.raises(ValidationError, match="at least one parameter"):
        streaming_thresholds({}.__getitem__, [], 2, 0.2)
    mixed = {"a": torch.ones(2, 3), "b": torch.ones(2, 3, dtype=torch.float64)}
    with pytest.raises(ValidationError, match="parameter 'b': deltas are torch.float64"):
        streaming_thresholds(mixed.__getitem__, ["a", "b"], 2, 0.2)


def test_each_parameter_is_read_once_per_pass():
    deltas = {f"p{i}": torch.randn(2, 8, 8) for i in range(5)}
    reads: list[str] = []
    streaming_thresholds(lambda n: (reads.append(n), deltas[n])[1], list(deltas), 2, 0.3)
    assert reads == list(deltas) * 2              # float32: two radix passes, one tensor at a time


def _set(seed: int = 0, n_tasks: int = 3) -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.weight": (12, 10), "blocks.0.attn.bias": (12,), "blocks.1.attn.weight": (12, 10),
              "blocks.1.mlp.weight": (8, 12), "norm.weight": (8,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = {}
    for t in range(n_tasks):
        # rounded deltas: many magnitudes tie, so the threshold's tie rule matters
        fts[f"t{t}"] = {k: v + torch.round(torch.randn(v.shape, generator=g) * 4) / 4 for k, v in base.items()}
    return TaskVectorSet.from_state_dicts(base, fts)


@pytest.mark.parametrize("method,knobs,modules", [
    ("ties", {"density": 0.3, "scope": "model"}, [ties]),
    ("dare", {"base": "ties", "scope": "model", "density": 0.4, "drop_rate": 0.3, "seed": 3}, [dare]),
    ("lines", {"base": "ties", "scope": "model", "density": 0.25}, [lines]),
    ("knots", {"inner": "ties", "scope": "model", "density": 0.2}, [knots]),
    ("knots", {"inner": "dare_ties", "scope": "model", "density": 0.3, "drop_rate": 0.2}, [knots]),
])
def test_every_whole_model_top_k_method_merges_as_with_the_concatenation(monkeypatch, method, knobs, modules):
    tvs = _set()
    streamed = merge(MergeInputs(tvs, device="cpu", persist=False), method, **knobs)
    for module in modules:
        monkeypatch.setattr(module, "model_thresholds", concatenated)
    reference = merge(MergeInputs(tvs, device="cpu", persist=False), method, **knobs)
    for name in tvs.param_names:
        assert torch.equal(streamed[name], reference[name]), name


def test_an_alpha_change_reuses_the_thresholds():
    inputs = MergeInputs(_set(), device="cpu", persist=False)
    first = merge(inputs, "ties", density=0.3, alpha=1.0)
    reads: list[str] = []
    real = inputs.deltas
    inputs.deltas = lambda name: (reads.append(name), real(name))[1]
    half = merge(inputs, "ties", density=0.3, alpha=0.5)
    assert reads == list(inputs.tvs.param_names)            # the merge loop only: no threshold pass
    for name in first:
        torch.testing.assert_close(half[name], 0.5 * first[name])
    merge(inputs, "ties", density=0.4, alpha=0.5)             # a new density: a new pass (two reads each)
    assert len(reads) == 4 * len(inputs.tvs.param_names)
