"""Decomposing a set larger than the device memory the engine may use: smaller
batches or the CPU, with a message, never a crash. The budget is the
$MERGESCOPE_DEVICE_MEMORY setting (tiny here); out-of-memory errors are
simulated by a kernel that fails on batches over a size."""
from __future__ import annotations

import pytest
import torch

import analysis.spectra as spectra
from analysis.device import memory_limit, out_of_memory
from analysis.errors import ResourceError, ValidationError
from analysis.spectra import SpectralCache
from analysis.taskvectors import TaskVectorSet, memory_budget

SHAPES = {"blocks.0.q.weight": (48, 32), "blocks.0.k.weight": (48, 32), "blocks.1.q.weight": (48, 32),
          "blocks.1.k.weight": (48, 32), "blocks.1.mlp.weight": (64, 48)}


def _set(seed: int = 0) -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
                                                 for t in ("a", "b", "c")})


def _same_factors(a: SpectralCache, b: SpectralCache) -> None:
    for name in a.names:
        torch.testing.assert_close(a.singular_values(name), b.singular_values(name))
        if b.device.type == "meta":                                  # factors() would hand out data-less tensors
            ub, sb, vhb = b._all()[name]
            assert ub.device.type == "cpu" and vhb.device.type == "cpu"
            continue
        ua, sa, vha = a.factors(name)
        ub, sb, vhb = b.factors(name)
        torch.testing.assert_close((ua * sa.unsqueeze(-2)) @ vha, (ub * sb.unsqueeze(-2)) @ vhb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("512MiB", 512 << 20), ("2GB", 2 * 10**9),
                                           ("1.5 GiB", int(1.5 * 2**30))])
def test_memory_setting_parses_sizes(monkeypatch, text, expected):
    monkeypatch.setenv("MERGESCOPE_DEVICE_MEMORY", text)
    assert memory_limit() == expected


def test_a_bad_memory_setting_is_named(monkeypatch):
    monkeypatch.setenv("MERGESCOPE_DEVICE_MEMORY", "lots")
    with pytest.raises(ValidationError, match="MERGESCOPE_DEVICE_MEMORY='lots'"):
        memory_limit()


def test_a_tiny_budget_splits_batches_with_a_message_and_the_same_factors(monkeypatch):
    tvs = _set()
    whole = SpectralCache(tvs, device="cpu", persist=False).compute()
    assert len(whole.report) == 2 and not whole.messages          # one batch per shape
    monkeypatch.setenv("MERGESCOPE_DEVICE_MEMORY", "256KiB")         # batch budget 64 KiB; one 48x32 parameter: 144 KiB
    small = SpectralCache(tvs, device="cpu", persist=False).compute()
    assert len(small.report) == 5 and all(r["matrices"] == 3 for r in small.report)   # one parameter per batch
    assert len(small.messages) == 2                                  # one per shape group
    assert all("over the 0.1 MiB budget on cpu; decomposing one parameter per batch" in m for m in small.messages)
    _same_factors(whole, small)


def test_out_of_memory_halves_the_batch_and_still_gives_every_factor(monkeypatch):
    tvs = _set()
    whole = SpectralCache(tvs, device="cpu", persist=False).compute()
    real = spectra.exact_svd
    sizes = []

    def fails_over_one_parameter(a, method="auto", tol=1e-5, keep=None):
        sizes.append(a.shape[0])
        if a.shape[0] > 3:                                           # more than one parameter of 3 tasks
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(a, method, tol, keep=keep)

    monkeypatch.setattr(spectra, "exact_svd", fails_over_one_parameter)
    cache = SpectralCache(tvs, device="cpu", persist=False).compute()
    assert sizes[:3] == [12, 6, 3]                                   # 4 parameters, then 2, then 1 per batch
    assert any("out of memory on cpu decomposing 4 parameters" in m and "retrying 2 per batch" in m
               for m in cache.messages)
    assert cache.compute_count == len(SHAPES)
    _same_factors(whole, cache)


def test_a_device_that_runs_out_of_memory_falls_back_to_the_cpu(monkeypatch):
    """No GPU here: the meta device stands in for one whose every decomposition runs out of memory."""
    tvs = _set()
    whole = SpectralCache(tvs, device="cpu", persist=False).compute()
    real = spectra.exact_svd

    def gpu_always_full(a, method="auto", tol=1e-5, keep=None):
        if a.device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(a, method, tol, keep=keep)

    monkeypatch.setattr(spectra, "exact_svd", gpu_always_full)
    monkeypatch.setattr(SpectralCache, "_storage", lambda self: torch.device("cpu"))
    cache = SpectralCache(tvs, device="meta", persist=False).compute()
    assert all(r["device"] == "cpu" for r in cache.report)
    assert sum("decomposing this group on the CPU" in m for m in cache.messages) == 2   # once per shape group
    _same_factors(whole, cache)
    monkeypatch.setenv("MERGESCOPE_DEVICE_MEMORY", "256KiB")         # over budget: straight to the CPU, no OOM first
    cache = SpectralCache(tvs, device="meta", persist=False).compute()
    assert all("decomposing on the CPU" in m for m in cache.messages) and len(cache.messages) == 2


def test_a_cpu_out_of_memory_for_one_parameter_is_a_named_error(monkeypatch):
    def always_full(a, method="auto", tol=1e-5, keep=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(spectra, "exact_svd", always_full)
    with pytest.raises(ResourceError, match=r"ran out of memory decomposing one parameter .*3 tasks of shape 48x32"):
        SpectralCache(_set(), device="cpu", persist=False).compute()


def test_other_errors_are_not_taken_for_out_of_memory():
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("out of memory"))


def test_the_setting_caps_the_resident_set_budget(monkeypatch):
    monkeypatch.setenv("MERGESCOPE_DEVICE_MEMORY", "64MiB")
    assert memory_budget(torch.device("cpu")) == 32 << 20
