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
