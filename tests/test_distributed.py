"""analysis.distributed: spectra, STI and a TSV-M merge as jobs keyed by
tensor name give the single-process results, in this process and on Ray.

The set: a tiny LLaMA (transformers.LlamaConfig, bf16, save_pretrained), a
base and three perturbed fine-tunes, read through TaskVectorSet.from_checkpoints.
Ray is started once for this module (2 CPUs, no dashboard) and shut down after.

What "identical" means here: SVD factors, STI and merged deltas are
compared bit for bit with a freshly computed SpectralCache's. (The store
keeps the Gram kernel's transposed U / Vh layout for that: BLAS rounds a
product of a transposed view and of a contiguous copy differently, ~1e-7.)
On Ray, STI is compared to 1e-9 relative: its float64 sums are split across
torch's threads, and a 1-CPU Ray task runs one thread where this process runs
two.
"""
from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from analysis import distributed as dist
from analysis.device import get_device
from analysis.errors import HyperparameterError, ValidationError
from analysis.interference import sti_tables
from analysis.merging import merge
from analysis.spectra import SpectralCache, singular_values_table
from analysis.taskvectors import TaskVectorSet

TASKS = ("code", "math", "chat")


DEVICE = get_device()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit on a CPU, wherever each lives (jobs hand their results back on the CPU). On a GPU,
    to 1e-5 relative: cuBLAS picks its kernels by batch size, so one parameter per job and the
    single process's shape-group batches differ in the last bits (H100: TSV-M, Iso-CTS merges)."""
    a, b = a.cpu(), b.cpu()
    if DEVICE.type == "cpu":
        return torch.equal(a, b)
    return a.shape == b.shape and float((a.double() - b.double()).norm()) <= 1e-5 * float(b.double().norm()) + 1e-12
RANK_FRACTION = 0.3


def _write_llama_set(root):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    base = model.state_dict()
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        tuned = {k: v + (0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        model.load_state_dict(tuned)
        model.save_pretrained(root / task)
    return root


@pytest.fixture(scope="module")
def llama_set(tmp_path_factory):
    root = _write_llama_set(tmp_path_factory.mktemp("tiny-llama"))
    return TaskVectorSet.from_checkpoints(root / "base", {t: root / t for t in TASKS})


@pytest.fixture(scope="module")
def reference(llama_set):
    """The single-process path: SpectralCache, interference.sti_tables, merging.merge."""
    cache = SpectralCache(llama_set, persist=False).compute()
    sti, pairs = sti_tables(llama_set, RANK_FRACTION, cache=cache)
    return cache, sti, pairs, merge(llama_set, "tsv_m", cache=cache)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    # a local start, as a user's; a small object store: only singular values and small tensors pass through it
    dist.connect(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()


def test_backend_is_off_by_default_and_named_values_only(monkeypatch):
    monkeypatch.delenv(dist.ENV_VAR, raising=False)
    assert dist.backend() == "off" and dist.Runner().backend == "off"
    monkeypatch.setenv(dist.ENV_VAR, " Ray ")
    assert dist.backend() == "ray"
    monkeypatch.setenv(dist.ENV_VAR, "dask")
    with pytest.raises(ValidationError, match="'dask'"):
        dist.backend()
    assert dist.backend("off") == "off"   # an argument wins over the environment


def test_ray_asked_for_without_ray_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray now raises ImportError
    with pytest.raises(dist.DistributedError, match=r"pip install 'mergescope\[ray\]'"):
        dist.Runner("ray")
    assert dist.Runner("off").backend == "off"      # the single-process path needs no Ray


def test_tasks_ask_for_one_gpu_each_on_cuda():
    pytest.importorskip("ray")
    # the driver may lack the GPUs its cluster has: "cuda" is taken as asked
    assert dist.Runner("ray", device="cuda").resources() == {"num_cpus": 1, "num_gpus": 1}
    assert dist.Runner("ray", device="cpu", cpus_per_task=2).resources() == {"num_cpus": 2, "num_gpus": 0}


def test_a_set_held_in_memory_is_refused_and_reopens_once_saved(tmp_path):
    tvs = TaskVectorSet.from_state_dicts({"w": torch.zeros(3, 3)}, {"a": {"w": torch.ones(3, 3)},
                                                                   "b": {"w": 2 * torch.ones(3, 3)}})
    with pytest.raises(dist.DistributedError, match=r"tvs.save\(path\)"):
        dist.recipe_of(tvs)
    saved = TaskVectorSet.load(tvs.save(tmp_path / "set.safetensors")).subset(["b"])
    reopened = dist.recipe_of(saved).open()
    assert reopened.tasks == ["b"] and torch.equal(reopened.deltas("w"), saved.deltas("w"))


@pytest.mark.parametrize("where", ["off", pytest.param("ray", marks=pytest.mark.slow)])
def test_factors_sti_and_tsv_m_match_the_single_process_path(where, llama_set, reference, tmp_path, request):
    if where == "ray":
        request.getfixturevalue("ray_session")
    cache, sti_ref, pairs_ref, merged_ref = reference
    runner = dist.Runner(where, device=str(DEVICE))   # the reference ran there
    calls = []
    store = dist.compute_spectra(llama_set, tmp_path / "factors", runner=runner,
                                 progress=lambda done, total, name: calls.append((done, total, name)))
    assert store.names == cache.names and len(store.names) == 15      # 2 blocks x 7 matrices + lm_head
    assert [(d, t) for d, t, _ in calls] == [(i, 15) for i in range(1, 16)]
    assert sorted(n for *_, n in calls) == sorted(store.names)
    for name in cache.names:
        for ours, theirs in zip(store.factors(name), cache.factors(name)):
            assert same(ours, theirs), name
    pd.testing.assert_frame_equal(singular_values_table(store), singular_values_table(cache), check_exact=True)

    sti, pairs = dist.sti_tables(store, RANK_FRACTION, runner=runner)
    exact = {"check_exact": True} if where == "off" else {"check_exact": False, "rtol": 1e-9, "atol": 0}
    pd.testing.assert_frame_equal(sti, sti_ref, **exact)
    pd.testing.assert_frame_equal(pairs, pairs_ref, **exact)

    merged = dist.merge(store, "tsv_m", runner=runner)
    assert list(merged) == list(merged_ref) == llama_set.param_names
    for name in merged_ref:
        assert same(merged[name], merged_ref[name]), name


def test_a_store_keeping_the_top_directions_serves_fractions_up_to_its_own(llama_set, reference, tmp_path):
    cache = reference[0]
    store = dist.compute_spectra(llama_set, tmp_path / "top", runner=dist.Runner("off"), max_rank_fraction=0.5)
    name = "model.layers.0.mlp.up_proj.weight"          # 48 x 32: k = 32, 16 directions kept
    u, s, vh = store.factors(name)
    u_ref, s_ref, vh_ref = cache.factors(name)
    assert same(s, s_ref) and u.shape[-1] == 16 == vh.shape[-2]
    assert same(u, u_ref[..., :16]) and same(vh, vh_ref[..., :16, :])

    sti, _ = dist.sti_tables(store, 1 / 3, runner=dist.Runner("off"))
    pd.testing.assert_frame_equal(sti, sti_tables(llama_set, 1 / 3, cache=cache)[0], check_exact=True)
    merged = dist.merge(store, "tsv_m", runner=dist.Runner("off"), rank_fraction=1 / 3)
    merged_ref = merge(llama_set, "tsv_m", cache=cache, rank_fraction=1 / 3)
    assert all(same(merged[n], merged_ref[n]) for n in merged_ref)
    with pytest.raises(HyperparameterError, match="0.75"):
        dist.merge(store, "tsv_m", runner=dist.Runner("off"), rank_fraction=0.75)


def test_every_method_without_data_splits_into_per_parameter_jobs(llama_set, reference, tmp_path):
    from analysis.merging import available_methods
    cache = reference[0]
    store = dist.compute_spectra(llama_set, tmp_path / "f", runner=dist.Runner("off"))
    # whole-model passes run in the driver: TIES (scope='model' by default), EMR, LiNeS, KnOTS; DARE's
    # masks are seeded per parameter name; Iso-CTS reads the task sum's SVD; TSV-C gives one delta per task
    methods = ["ties", "emr", "lines", "knots", "dare", "iso_cts", "tsv_c"]
    assert set(methods) <= set(available_methods(len(TASKS), has_data=False))
    for method in methods:
        ours = dist.merge(store, method, runner=dist.Runner("off"))
        ref = merge(llama_set, method, cache=cache)
        for task in TASKS:
            assert all(same(ours.for_task(task)[n], ref.for_task(task)[n]) for n in ref.for_task(task)), method
    with pytest.raises(ValidationError, match="labelled data"):
        dist.merge(store, "regmean")


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["full", 0.5])
def test_the_apps_spectral_cache_on_ray_gives_the_same_factors_and_names_the_cluster(keep, llama_set, tmp_path,
                                                                                     monkeypatch, request):
    request.getfixturevalue("ray_session")
    local = SpectralCache(llama_set, persist=False, keep=keep).compute()
    monkeypatch.setenv(dist.ENV_VAR, "ray")
    calls = []
    on_ray = SpectralCache(llama_set, cache_dir=tmp_path, keep=keep,
                           progress=lambda done, total, what: calls.append((done, total, what))).compute()
    assert [(d, t) for d, t, _ in calls] == [(i, 15) for i in range(1, 16)]
    assert all("Ray at this machine: 1 node, 2 CPUs, 0 GPUs" in what for *_, what in calls), calls[0]
    assert on_ray.compute_count == 15 and len(on_ray.report) == 15
    assert {r["method"] for r in on_ray.report} == {r["method"] for r in local.report}   # the Spectra page names it
    assert all(r["ray"].startswith("Ray at this machine") for r in on_ray.report)
    for name in local.names:
        kept = local.kept_rank(name)
        assert on_ray.kept_rank(name) == kept
        for ours, theirs in zip(on_ray.top(name, kept), local.top(name, kept)):
            assert same(ours, theirs), name
    on_ray.flush()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ray-")] == []   # the working folder is gone
    monkeypatch.setenv(dist.ENV_VAR, "off")   # the file it wrote is the cache a single-process start reads
    again = SpectralCache(llama_set, cache_dir=tmp_path, keep=keep).compute()
    first = local.names[0]
    assert again.compute_count == 0 and same(again.top(first, 1)[0], local.top(first, 1)[0])


def test_the_sidebar_says_when_spectra_run_on_ray(monkeypatch):
    from ui.state import distributed_label
    monkeypatch.delenv(dist.ENV_VAR, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert distributed_label() is None
    monkeypatch.setenv(dist.ENV_VAR, "ray")
    assert "Ray tasks on a local Ray on this machine" in distributed_label()
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert "ray://head:10001" in distributed_label()
    monkeypatch.setenv(dist.ENV_VAR, "dask")
    assert "'dask'" in distributed_label()   # shown in the sidebar, never a traceback on every page
