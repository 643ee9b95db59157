"""Merged models written as sharded safetensors in the transformers layout (analysis.shards,
analysis.report.write_hf_model / merged_model): a tiny LLaMA set in bf16 merged and exported in
several shards loads with AutoModelForCausalLM, bf16, weights = base + merged delta; the writer
holds at most one shard of a streamed merge; packing is huggingface_hub's; folders are whole."""
from __future__ import annotations

import json
import re
import weakref

import pytest
import torch
from safetensors import safe_open

from analysis.errors import ValidationError
from analysis.report import merged_model, write_hf_model
from analysis.shards import INDEX_FILE, ShardWriter, parse_size
from analysis.taskvectors import TaskVectorSet

SHARD = "16KB"   # the tiny LLaMA is ~60 kB in bf16: several shards


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> dict:
    """A bf16 LlamaForCausalLM saved with save_pretrained, and two perturbed copies of it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    tasks = {}
    for i, task in enumerate(("code", "math")):
        with torch.no_grad():
            tuned = LlamaForCausalLM(cfg).to(torch.bfloat16)
            tuned.load_state_dict(model.state_dict())
            for p in tuned.parameters():
                p.add_(0.02 * (i + 1) * torch.randn_like(p))
        tuned.save_pretrained(root / task)
        tasks[task] = root / task
    return {"base": root / "base", "tasks": tasks, "root": root}


def test_tiny_llama_merge_exports_sharded_bf16_and_loads_with_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    from tinybert import transformers_log
    from analysis.merging import merge
    before = {p: p.stat().st_mtime_ns for p in tiny_llama["root"].rglob("*")}
    tvs = TaskVectorSet.from_checkpoints(tiny_llama["base"], tiny_llama["tasks"])   # the app's loading code
    stream = merged_model(tvs, merge_into=lambda sink: merge(tvs, "task_arithmetic", alpha=0.4, sink=sink))
    out = write_hf_model(tmp_path / "merged", stream, tiny_llama["base"], max_shard_size=SHARD,
                         metadata={"method": "task_arithmetic", "knobs": {"alpha": 0.4}},
                         protect=list(tvs.sources.values()))

    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted({*index["weight_map"].values()})
    n = len(shards)
    assert n >= 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    with safe_open(str(tiny_llama["base"] / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert set(index["weight_map"]) == base_keys
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(f.keys())
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16, k            # bf16 in, bf16 out
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    meta = json.loads((out / "mergescope.json").read_text())
    assert meta["weights"] == [*shards, INDEX_FILE] and meta["missing_on_load"] == []

    (model, info), log = transformers_log(lambda: AutoModelForCausalLM.from_pretrained(out, output_loading_info=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert "MISSING" not in log and "UNEXPECTED" not in log and "newly initialized" not in log, log
    assert model.dtype == torch.bfloat16
    merged = merge(tvs, "task_arithmetic", alpha=0.4)              # float32 deltas, resident
    state = model.state_dict()
    for name in tvs.param_names:
        expected = (tvs.base_tensor(name).float() + merged[name].cpu()).to(torch.bfloat16)   # the export adds on the CPU
        assert torch.equal(state[name], expected), name
    assert {p: p.stat().st_mtime_ns for p in tiny_llama["root"].rglob("*")} == before   # inputs untouched


def test_a_streamed_export_holds_at_most_one_shard(tmp_path):
    """Every tensor handed over is released once its shard is written (weak references to its storage)."""
    limit = 4096
    alive: list[tuple[weakref.ref, int]] = []
    peak = 0
    g = torch.Generator().manual_seed(0)

    def produce(emit):
        nonlocal peak
        for i in range(24):
            t = torch.randn(16, 16 + 8 * (i % 3), generator=g)          # 1-2.5 kB each
            emit(f"layers.{i}.weight", t)
            alive.append((weakref.ref(t.untyped_storage()), t.numel() * t.element_size()))   # the memory, not the view
            del t
            peak = max(peak, sum(size for ref, size in alive if ref() is not None))

    out = write_hf_model(tmp_path / "streamed", produce, {"model_type": "toy"}, max_shard_size=limit)
    assert 0 < peak <= limit
    assert len(json.loads((out / INDEX_FILE).read_text())["weight_map"]) == 24


def test_packing_is_huggingface_hubs(tmp_path):
    """Same shards as huggingface_hub.split_torch_state_dict_into_shards (what save_pretrained uses),
    a tensor larger than the limit alone in its own."""
    from huggingface_hub import split_torch_state_dict_into_shards
    g = torch.Generator().manual_seed(1)
    sizes = [300, 500, 200, 900, 2500, 100, 700, 400, 400, 60]
    state = {f"t{i}": torch.randn(s // 4, generator=g) for i, s in enumerate(sizes)}
    writer = ShardWriter(tmp_path, 1000)
    for k, v in state.items():
        writer.add(k, v)
    files = writer.finish()
    ours = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    theirs = split_torch_state_dict_into_shards(state, max_shard_size=1000).tensor_to_filename
    group = lambda wm: sorted(sorted(k for k in wm if wm[k] == f) for f in set(wm.values()))  # noqa: E731
    assert group(ours) == group(theirs)
    assert writer.peak_bytes <= 1000 + 2500 and files[-1] == INDEX_FILE
    assert writer.total_size == sum(sizes)


def test_one_shard_is_a_single_model_safetensors_and_a_new_export_replaces_the_whole_folder(tiny_llama, tmp_path):
    tvs = TaskVectorSet.from_checkpoints(tiny_llama["base"], tiny_llama["tasks"])
    out = tmp_path / "merged"
    write_hf_model(out, merged_model(tvs, tvs.sum()), tiny_llama["base"], max_shard_size=SHARD)
    assert (out / INDEX_FILE).is_file()
    write_hf_model(out, merged_model(tvs, tvs.sum(), alpha=0.5), tiny_llama["base"])   # 5GB: one file
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not [n for n in names if re.match(r"model-\d+-of-", n) or
                                                  n == INDEX_FILE]   # no shard of the earlier export left
    assert not list(tmp_path.glob(".*.tmp"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.mlp.up_proj.weight"
        expected = (tvs.base_tensor(name).float() + 0.5 * tvs.sum()[name]).to(torch.bfloat16)
        assert torch.equal(f.get_tensor(name), expected)


def test_never_written_into_over_or_around_a_checkpoint_folder(tiny_llama, tmp_path):
    tvs = TaskVectorSet.from_checkpoints(tiny_llama["base"], tiny_llama["tasks"])
    stream = merged_model(tvs, tvs.sum())
    protect = list(tvs.sources.values())
    for out, why in ((tiny_llama["tasks"]["code"] / "merged", "checkpoint folder"),
                     (tiny_llama["root"], "checkpoint folder"),          # would hold (and replace) the inputs
                     (tiny_llama["base"], "base model's folder")):
        with pytest.raises(ValidationError, match=why):
            write_hf_model(out, stream, tiny_llama["base"], protect=protect)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(ValidationError, match="not an earlier export"):
        write_hf_model(foreign, stream, tiny_llama["base"])
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]


def test_a_per_task_delta_is_refused_by_name(tiny_llama, tmp_path):
    tvs = TaskVectorSet.from_checkpoints(tiny_llama["base"], tiny_llama["tasks"])
    name = tvs.param_names[0]
    stacked = {name: tvs.deltas(name)}
    with pytest.raises(ValidationError, match=re.escape(name) + ".*per-task method"):
        write_hf_model(tmp_path / "m", merged_model(tvs, stacked), tiny_llama["base"])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10 ** 9), ("200MB", 2 * 10 ** 8), ("64KiB", 65536),
                                           ("1.5 GiB", 3 * 2 ** 29), (4096, 4096), ("512", 512)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5XB", "GB", "", 0, -3, "0MB", True])
def test_parse_size_names_the_bad_value(bad):
    with pytest.raises(ValidationError, match=re.escape(repr(bad))):
        parse_size(bad)


def test_write_hf_model_rejects_a_bad_shard_size_before_writing(tmp_path):
    with pytest.raises(ValidationError, match="'5 apples'"):
        write_hf_model(tmp_path / "m", {"w": torch.ones(2)}, {"model_type": "toy"}, max_shard_size="5 apples")
    assert not (tmp_path / "m").exists()
