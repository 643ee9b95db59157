from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from analysis.device import get_device
from analysis.errors import MergescopeError, ValidationError
from analysis.taskvectors import TaskVector, TaskVectorSet, parameter_depth, parameter_kind


def _set(seed=0, tasks=("a", "b", "c")):
    g = torch.Generator().manual_seed(seed)
    base = {"encoder.layer.0.attn.weight": torch.randn(6, 4, generator=g),
            "encoder.layer.1.attn.weight": torch.randn(6, 4, generator=g),
            "encoder.layer.1.attn.bias": torch.randn(6, generator=g),
            "conv.blocks.2.weight": torch.randn(3, 2, 3, 3, generator=g),
            "embeddings.word_embeddings.weight": torch.randn(10, 4, generator=g)}
    fts = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for t in tasks}
    return base, fts, TaskVectorSet.from_state_dicts(base, fts)


@pytest.mark.parametrize("name,depth", [
    ("encoder.layer.3.attention.self.query.weight", 3), ("model.layers.11.mlp.up_proj.weight", 11),
    ("blocks.3.attn.qkv.weight", 3), ("visual.transformer.resblocks.7.mlp.c_fc.weight", 7),
    ("transformer.h.2.attn.c_attn.weight", 2), ("embeddings.word_embeddings.weight", None),
    ("pooler.dense.weight", None), ("vision_model.encoder.layers.0.self_attn.k_proj.weight", 0)])
def test_depth_parsed_from_names(name, depth):
    assert parameter_depth(name) == depth


def test_kinds():
    assert parameter_kind("encoder.layer.0.q.weight", (4, 4)) == "matrix"
    assert parameter_kind("conv1.weight", (8, 3, 3, 3)) == "conv"
    assert parameter_kind("embeddings.word_embeddings.weight", (100, 4)) == "embedding"
    assert parameter_kind("transformer.wte.weight", (100, 4)) == "embedding"
    assert parameter_kind("ln.weight", (4,)) == "vector"
    assert parameter_kind("logit_scale", ()) == "vector"


def test_task_arithmetic_values_and_apply():
    base, fts, tvs = _set()
    ta = tvs.task_vector("a")
    tb = tvs.task_vector("b")
    total = tvs.sum(["a", "b"])
    for n in tvs.param_names:
        assert torch.allclose(total[n], ta[n] + tb[n])
        assert torch.allclose((ta - tb)[n], ta[n] - tb[n])
        assert torch.equal((-ta)[n], -ta[n])
        assert torch.allclose((0.5 * ta)[n], ta.scale(0.5)[n])
    assert isinstance(sum([ta, tb]), TaskVector)
    # applying a task's own vector at alpha=1 gives back its fine-tuned model
    rebuilt = tvs.apply(ta)
    for n in base:
        assert torch.allclose(rebuilt[n], fts["a"][n], atol=1e-6)
    sub = tvs.subset(["c"])
    assert sub.tasks == ["c"] and torch.equal(sub.delta("c", tvs.param_names[0]), tvs.delta("c", tvs.param_names[0]))
    with pytest.raises(ValidationError, match="no task named 'z'"):
        tvs.subset(["z"])


def test_save_load_round_trip(tmp_path):
    _, _, tvs = _set()
    path = tvs.save(tmp_path / "out" / "set.safetensors")
    loaded = TaskVectorSet.load(path)
    assert loaded.tasks == tvs.tasks and loaded.param_names == tvs.param_names
    for t in tvs.tasks:
        for n in tvs.param_names:
            assert torch.equal(loaded.delta(t, n), tvs.delta(t, n))
            assert loaded.kind(n) == tvs.kind(n)
    assert loaded.fingerprint() == tvs.fingerprint()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_fingerprint_changes_with_content():
    base, fts, tvs = _set()
    fts["b"]["encoder.layer.0.attn.weight"] = fts["b"]["encoder.layer.0.attn.weight"] + 1e-3
    assert TaskVectorSet.from_state_dicts(base, fts).fingerprint() != tvs.fingerprint()


def test_fingerprint_of_many_parameters_on_threads_keeps_order_and_per_parameter_digests():
    g = torch.Generator().manual_seed(0)
    base = {f"p{i}": torch.zeros(5, 3) for i in range(40)}            # more than the pool holds in flight
    fts = {t: {k: torch.randn(5, 3, generator=g) for k in base} for t in ("a", "b")}
    tvs = TaskVectorSet.from_state_dicts(base, fts)
    full = tvs.fingerprint()
    assert full == TaskVectorSet.from_state_dicts(base, fts).fingerprint()      # content, not identity
    reads = tvs.reads
    part = tvs.fingerprint(["p3", "p1"])
    assert tvs.reads == reads                                                  # digests kept per parameter
    assert part != tvs.fingerprint(["p1", "p3"]) and part != full              # names in order
    fts["a"]["p39"] = fts["a"]["p39"].clone()
    fts["a"]["p39"][4, 2] += 1e-6                                              # the last tensor's last number
    assert TaskVectorSet.from_state_dicts(base, fts).fingerprint() != full


def test_delta_reads_one_tensor_at_a_time_from_a_sharded_checkpoint(tmp_path):
    """Per-parameter access materialises exactly the two tensors it needs."""
    n_layers = 12
    base = {f"layers.{i}.w": torch.randn(256, 256) for i in range(n_layers)}
    for folder, shift in (("base", 0.0), ("ft", 1.0)):
        d = tmp_path / folder
        d.mkdir()
        weight_map = {}
        for shard in range(3):
            names = [f"layers.{i}.w" for i in range(n_layers) if i % 3 == shard]
            fname = f"model-{shard + 1:05d}-of-00003.safetensors"
            save_file({n: base[n] + shift for n in names}, d / fname)
            weight_map.update({n: fname for n in names})
        import json
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", {"t": tmp_path / "ft"})
    ft_source = tvs._tasks["t"].source
    assert tvs.base.reads == 0 and ft_source.reads == 0  # validation used headers only
    d = tvs.delta("t", "layers.5.w")
    assert torch.allclose(d, torch.ones(256, 256))
    assert (tvs.base.reads, ft_source.reads) == (1, 1)


def test_device_choice_and_override(monkeypatch):
    monkeypatch.delenv("MERGESCOPE_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected
    monkeypatch.setenv("MERGESCOPE_DEVICE", "cpu")
    assert get_device().type == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("MERGESCOPE_DEVICE", "cuda")
        with pytest.raises(MergescopeError, match="CUDA is not available"):
            get_device()


# ------------------------------------------------------------ resident sets
def _files(tmp_path, tasks=("a", "b", "c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"blocks.0.w": torch.randn(16, 8, generator=g), "blocks.0.b": torch.randn(16, generator=g),
            "blocks.1.w": torch.randn(8, 16, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    paths = {}
    for t in tasks:
        save_file({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"{t}.safetensors")
        paths[t] = tmp_path / f"{t}.safetensors"
    return TaskVectorSet.from_checkpoints(tmp_path / "base.safetensors", paths)


def test_a_resident_set_reads_and_validates_each_parameter_once(tmp_path, monkeypatch):
    streaming = _files(tmp_path)
    tvs = _files(tmp_path)
    assert tvs.keep_resident("cpu") == torch.device("cpu") and tvs.reads == 0   # decided from headers only
    checks = []
    import analysis.taskvectors as tv
    real_isfinite = torch.isfinite
    monkeypatch.setattr(tv.torch, "isfinite", lambda t: checks.append(1) or real_isfinite(t))
    first = {n: tvs.deltas(n) for n in tvs.param_names}
    reads, n_checks = tvs.reads, len(checks)
    assert reads == len(tvs.param_names) * (1 + len(tvs.tasks))      # the base once, each task once
    for n in tvs.param_names:                                          # a second pass: a slider move
        assert tvs.deltas(n) is first[n]
        for t in tvs.tasks:
            tvs.delta(t, n)
    assert tvs.reads == reads and len(checks) == n_checks              # nothing read, nothing re-checked
    for n in tvs.param_names:
        for t in tvs.tasks:
            assert torch.equal(tvs.delta(t, n), streaming.delta(t, n))
    assert tvs.fingerprint() == streaming.fingerprint()
    # the streaming set re-reads every time (today's path) but checks values only the first time
    before = streaming.reads
    streaming.deltas("blocks.0.w")
    streaming.deltas("blocks.0.w")
    assert streaming.reads == before + 2 * (1 + len(streaming.tasks))


def test_resident_needs_the_budget_and_streams_otherwise(tmp_path):
    tvs = _files(tmp_path)
    need = tvs.stacked_bytes()
    assert need == 4 * 3 * (16 * 8 + 16 + 8 * 16)
    assert tvs.keep_resident("cpu", budget_bytes=need - 1) is None       # a 7B set is never loaded whole
    tvs.deltas("blocks.0.w")
    tvs.deltas("blocks.0.w")
    assert tvs.reads == 2 * 4 and not tvs.is_resident
    assert tvs.keep_resident("cpu", budget_bytes=need) == torch.device("cpu")
    tvs.materialize()
    reads = tvs.reads
    tvs.materialize()
    tvs.sum()
    assert tvs.reads == reads


def test_a_resident_set_still_refuses_non_finite_values(tmp_path):
    base = {"blocks.0.w": torch.zeros(4, 4)}
    bad = {"blocks.0.w": torch.full((4, 4), float("nan"))}
    tvs = TaskVectorSet.from_state_dicts(base, {"ok": base, "bad": bad})
    tvs.keep_resident("cpu")
    with pytest.raises(ValidationError, match=r"task 'bad'.*NaN"):
        tvs.deltas("blocks.0.w")
    with pytest.raises(ValidationError, match="NaN"):
        tvs.materialize()


def test_subset_of_a_resident_set_shares_its_tensors(tmp_path):
    tvs = _files(tmp_path, tasks=("a", "b", "c", "d"))
    tvs.keep_resident("cpu")
    tvs.materialize()
    reads = tvs.reads
    sub = tvs.subset(["b", "c"])
    pair = sub.deltas("blocks.1.w")
    assert pair.data_ptr() == tvs.deltas("blocks.1.w")[1].data_ptr()      # a view, no copy
    apart = tvs.subset(["d", "a"]).deltas("blocks.1.w")
    assert torch.equal(apart, tvs.deltas("blocks.1.w")[[3, 0]])
    assert torch.equal(tvs.deltas("blocks.0.b", ["c", "a"]), tvs.deltas("blocks.0.b")[[2, 0]])
    assert tvs.reads == reads and sub.reads == 0
