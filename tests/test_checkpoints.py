"""Round trips through real formats written by real libraries."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis.checkpoints import open_checkpoint
from analysis.errors import CheckpointError, ValidationError
from analysis.taskvectors import TaskVectorSet

transformers = pytest.importorskip("transformers")


def _perturbed(model, seed: int, scale: float = 0.01):
    """A 'fine-tuned' copy: every floating parameter nudged deterministically."""
    g = torch.Generator().manual_seed(seed)
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return tuned


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def _clip_vision():
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"bert": _bert, "clip_vision": _clip_vision, "llama": _llama}


def _assert_exact_deltas(tvs, base_model, tuned_models):
    base_sd = base_model.state_dict()
    for task, model in tuned_models.items():
        sd = model.state_dict()
        for name in tvs.param_names:
            expected = sd[name].float() - base_sd[name].float()
            assert torch.equal(tvs.delta(task, name), expected), (task, name)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hf_folders_single_and_sharded(tmp_path, arch, shard):
    base = MODELS[arch]()
    tuned = {"a": _perturbed(base, 1), "b": _perturbed(base, 2)}
    kwargs = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(tmp_path / "base", **kwargs)
    for task, m in tuned.items():
        m.save_pretrained(tmp_path / task, **kwargs)
    if shard:
        assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", {t: tmp_path / t for t in tuned})
    assert tvs.tasks == ["a", "b"]
    _assert_exact_deltas(tvs, base, tuned)
    kinds = {tvs.kind(n) for n in tvs.param_names}
    assert {"matrix", "vector"} <= kinds
    depths = {tvs.depth(n) for n in tvs.param_names}
    assert {0, 1} <= depths


def test_pytorch_model_bin_folder_and_torch_files(tmp_path):
    base = _bert()
    tuned = {"a": _perturbed(base, 1)}
    # an older-style HF folder: config.json + pytorch_model.bin
    base.config.save_pretrained(tmp_path / "base")
    torch.save(base.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    torch.save(tuned["a"].state_dict(), tmp_path / "a.pt")
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", {"a": tmp_path / "a.pt"})
    _assert_exact_deltas(tvs, base, tuned)


def test_single_safetensors_file(tmp_path):
    base = {"blocks.0.w": torch.randn(4, 3), "blocks.0.b": torch.randn(4)}
    ft = {k: v + 1 for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base.safetensors", {"t": tmp_path / "ft.safetensors"})
    assert torch.equal(tvs.delta("t", "blocks.0.w"), ft["blocks.0.w"] - base["blocks.0.w"])


class PickledModule(torch.nn.Module):
    """Stands in for an open_clip module pickled whole."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(3, 4)


def test_pickled_module_needs_trust_flag(tmp_path):
    torch.manual_seed(0)
    m = PickledModule()
    torch.save(m, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        open_checkpoint(tmp_path / "whole.pt")
    src = open_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(src.get("visual.weight"), m.visual.weight.detach())


def test_lora_adapter_written_by_peft_matches_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    base = _bert()
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                          rank_pattern={"value": 2}, alpha_pattern={"value": 6}, init_lora_weights=False)
    torch.manual_seed(3)
    model = peft.get_peft_model(_bert(), cfg)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    tvs = TaskVectorSet.from_lora(tmp_path / "base", {"lora": tmp_path / "adapter"})
    base_sd = base.state_dict()
    touched = 0
    for name in tvs.param_names:
        expected = merged[name].float() - base_sd[name].float()
        got = tvs.delta("lora", name)
        assert torch.allclose(got, expected, atol=1e-6), name
        touched += bool(got.abs().sum() > 0)
    assert touched >= 6  # query, value and every dense layer of both blocks


def test_lora_fan_in_fan_out_gpt2(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    base = transformers.GPT2Model(cfg)
    base.save_pretrained(tmp_path / "base")
    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                           init_lora_weights=False)
    torch.manual_seed(1)
    m = transformers.GPT2Model(cfg)
    m.load_state_dict(base.state_dict())
    model = peft.get_peft_model(m, lcfg)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", {"lora": tmp_path / "adapter"})
    name = "h.0.attn.c_attn.weight"
    assert torch.allclose(tvs.delta("lora", name), merged[name] - base.state_dict()[name], atol=1e-6)
    assert tvs.depth(name) == 0


# ------------------------------------------------------------ bad inputs

def _pair(tmp_path, base, ft):
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    return lambda: TaskVectorSet.from_checkpoints(tmp_path / "base.safetensors", {"t": tmp_path / "ft.safetensors"})


def test_missing_and_extra_keys_name_file_and_tensor(tmp_path):
    base = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}
    with pytest.raises(ValidationError, match=r"ft\.safetensors.*missing.*b\.weight"):
        _pair(tmp_path, base, {"a.weight": torch.zeros(2, 2)})()
    with pytest.raises(ValidationError, match=r"ft\.safetensors.*lacks.*c\.weight"):
        _pair(tmp_path, base, {**base, "c.weight": torch.zeros(2)})()


def test_extra_head_can_be_excluded(tmp_path):
    base = {"a.weight": torch.zeros(2, 2), "classifier.weight": torch.zeros(3, 2)}
    ft = {"a.weight": torch.ones(2, 2), "classifier.weight": torch.ones(5, 2)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base.safetensors", {"t": tmp_path / "ft.safetensors"},
                                         exclude=[r"^classifier\."])
    assert tvs.param_names == ["a.weight"]


def test_shape_mismatch(tmp_path):
    with pytest.raises(ValidationError, match=r"ft\.safetensors.*'a\.weight'.*\(3, 2\).*\(2, 2\)"):
        _pair(tmp_path, {"a.weight": torch.zeros(2, 2)}, {"a.weight": torch.zeros(3, 2)})()


def test_non_floating_tensor(tmp_path):
    with pytest.raises(ValidationError, match=r"'a\.weight'.*torch\.int64"):
        _pair(tmp_path, {"a.weight": torch.zeros(2, 2)}, {"a.weight": torch.zeros(2, 2, dtype=torch.int64)})()
    # integer buffers present in both are carried, not merged
    tvs = _pair(tmp_path, {"a.weight": torch.zeros(2, 2), "ids": torch.arange(3)},
                {"a.weight": torch.ones(2, 2), "ids": torch.arange(3)})()
    assert tvs.buffers == ["ids"] and tvs.param_names == ["a.weight"]
    with pytest.raises(ValidationError, match="'ids'.*not floating"):
        tvs.delta("t", "ids")


def test_nan_and_inf_named(tmp_path):
    bad = torch.zeros(2, 2)
    bad[0, 1] = float("nan")
    tvs = _pair(tmp_path, {"a.weight": torch.zeros(2, 2)}, {"a.weight": bad})()
    with pytest.raises(ValidationError, match=r"ft\.safetensors.*'a\.weight'.*1 NaN/Inf"):
        tvs.delta("t", "a.weight")
    with pytest.raises(ValidationError, match="NaN/Inf"):
        tvs.validate()


def test_empty_truncated_and_missing_weights(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors.*empty"):
        open_checkpoint(tmp_path / "empty.safetensors")
    save_file({"a": torch.randn(64, 64)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        open_checkpoint(tmp_path / "cut.safetensors").get("a")
    torch.save({"a": torch.randn(64, 64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        open_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"nothing: no model weights found.*config\.json"):
        open_checkpoint(tmp_path / "nothing")


def test_duplicate_task_names(tmp_path):
    base = {"a.weight": torch.zeros(2, 2)}
    with pytest.raises(ValidationError, match="duplicate task name 'x'"):
        TaskVectorSet.from_state_dicts(base, [("x", base), ("x", base)])


def test_lora_target_missing_in_base(tmp_path):
    save_file({"encoder.layer.0.query.weight": torch.zeros(4, 4)}, tmp_path / "base.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.encoder.layer.0.key.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.encoder.layer.0.key.lora_B.weight": torch.zeros(4, 2)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*encoder\.layer\.0\.key"):
        TaskVectorSet.from_checkpoints(tmp_path / "base.safetensors", {"t": adapter})


def test_nothing_written_into_input_folders(tmp_path):
    base = _bert()
    base.save_pretrained(tmp_path / "base")
    _perturbed(base, 1).save_pretrained(tmp_path / "a")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    tvs = TaskVectorSet.from_checkpoints(tmp_path / "base", {"a": tmp_path / "a"})
    tvs.validate()
    with pytest.raises(ValidationError, match="refusing to write"):
        tvs.save(tmp_path / "a" / "set.safetensors")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
