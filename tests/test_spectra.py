"""SpectralCache and spectra tables against answers known by construction."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from analysis.errors import ValidationError
from analysis.spectra import (SpectralCache, effective_rank, effective_rank_table, energy_table, exact_svd,
                              factor_errors, singular_values_table, svd_gram, truncation_rank, tsvc_accuracy_table,
                              tsvc_delta, tsvc_error_table)
from analysis.svd import kept_factor_errors
from analysis.taskvectors import TaskVectorSet


def _set(deltas: dict[str, dict[str, torch.Tensor]], base: dict[str, torch.Tensor] | None = None) -> TaskVectorSet:
    first = next(iter(deltas.values()))
    base = base or {k: torch.zeros_like(v) for k, v in first.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: base[k] + d[k] for k in base} for t, d in deltas.items()})


def _random_set(seed=0, tasks=("a", "b", "c")):
    g = torch.Generator().manual_seed(seed)
    return _set({t: {"blocks.0.attn.weight": torch.randn(12, 8, generator=g),
                     "blocks.0.mlp.weight": torch.randn(6, 10, generator=g),
                     "blocks.1.attn.weight": torch.randn(12, 8, generator=g),
                     "blocks.1.conv.weight": torch.randn(4, 3, 2, 2, generator=g),
                     "blocks.1.norm.bias": torch.randn(8, generator=g)} for t in tasks})


def _test_matrices(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """3 matrices m × n: "random" Gaussian, "ill" (singular values over 7 decades: a float32 Gram
    would lose the tail) or "rank2"."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "random":
        return torch.randn(3, m, n, generator=g)
    if kind == "ill":
        u, _ = torch.linalg.qr(torch.randn(3, m, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(3, n, k, generator=g, dtype=torch.float64))
        return ((u * torch.logspace(0, -7, k, dtype=torch.float64)) @ v.mT).float()
    return torch.randn(3, m, 2, generator=g) @ torch.randn(3, 2, n, generator=g)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (20, 20)])
@pytest.mark.parametrize("kind", ["random", "ill", "rank2"])
def test_gram_svd_is_exact(shape, kind):
    m, n = shape
    k = min(m, n)
    a = _test_matrices(kind, m, n, seed=1)
    u, s, vh = svd_gram(a)
    assert u.shape == (3, m, k) and s.shape == (3, k) and vh.shape == (3, k, n)
    rec, orth = factor_errors(a, u, s, vh)
    assert float(rec.max()) < 1e-5 and float(orth.max()) < 1e-5
    ref = torch.linalg.svdvals(a.double())
    assert torch.allclose(s.double(), ref, atol=1e-5 * float(ref.max()))
    assert bool((s[:, :-1] >= s[:, 1:]).all())


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (20, 20)])
@pytest.mark.parametrize("kind", ["random", "ill", "rank2"])
def test_gram_svd_keeping_the_top_k_forms_those_and_every_value(shape, kind):
    """keep=K: U, Vh are the full route's first K columns, S every value (the tail from the eigenvalues)."""
    m, n = shape
    k = min(m, n)
    a = _test_matrices(kind, m, n, seed=2)
    kk = 2 if kind == "rank2" else 5
    fu, fs, fvh = svd_gram(a)
    u, s, vh = svd_gram(a, keep=kk)
    assert u.shape == (3, m, kk) and s.shape == (3, k) and vh.shape == (3, kk, n)
    assert torch.allclose(u, fu[..., :kk], atol=1e-6) and torch.allclose(vh, fvh[..., :kk, :], atol=1e-6)
    ref = torch.linalg.svdvals(a.double())
    assert torch.allclose(s.double(), ref, atol=1e-6 * float(ref.max()))
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    rec, orth = kept_factor_errors(a, u, s, vh)
    assert float(rec.max()) < 1e-5 and float(orth.max()) < 1e-5
    (u2, s2, vh2), info = exact_svd(a, "gram", keep=kk)
    assert info["fallbacks"] == 0 and info["kept"] == kk and u2.shape[-1] == kk and s2.shape[-1] == k


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_kept_factor_checks_catch_a_wrong_direction_and_a_wrong_value(shape):
    a = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    u, s, vh = svd_gram(a, keep=4)
    bad_v = vh.clone()
    bad_v[0, 1] = torch.linalg.qr(torch.randn(shape[1], 1))[0][:, 0]     # not a right singular vector
    bad_u = u.clone()
    bad_u[0, :, 1] = torch.linalg.qr(torch.randn(shape[0], 1))[0][:, 0]
    bad_s = s.clone()
    bad_s[0, -1] *= 1.5                                                 # a tail value off: energy mismatch
    for uu, ss, vv in ((u, s, bad_v), (bad_u, s, vh), (u, bad_s, vh)):
        rec, orth = kept_factor_errors(a, uu, ss, vv)
        assert float(torch.maximum(rec, orth)[0]) > 1e-3 and float(torch.maximum(rec, orth)[1]) < 1e-5
    (u2, s2, vh2), info = exact_svd(a, "gram", tol=0.0, keep=4)     # nothing passes a zero tolerance
    assert info["fallbacks"] == 2 and u2.shape[-1] == 4 and s2.shape[-1] == min(shape)
    ref = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.allclose(s2.double(), ref.S, atol=1e-5)


def test_exact_svd_falls_back_when_the_check_fails():
    a = torch.randn(2, 10, 6)
    (_, _, _), info = exact_svd(a, "gram", tol=0.0)  # nothing passes a zero tolerance
    assert info["fallbacks"] == 2
    (u, s, vh), info = exact_svd(a, "gram")
    assert info["fallbacks"] == 0
    with pytest.raises(ValidationError, match="method"):
        exact_svd(a, "qr")


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_cache_factors_reconstruct_each_task(tmp_path, method):
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path, method=method)
    assert cache.names == ["blocks.0.attn.weight", "blocks.0.mlp.weight", "blocks.1.attn.weight",
                           "blocks.1.conv.weight"]
    for name in cache.names:
        u, s, vh = cache.factors(name)
        for ti, task in enumerate(tvs.tasks):
            d = tvs.delta(task, name)
            rec = ((u[ti] * s[ti]) @ vh[ti]).reshape(d.shape)
            assert torch.allclose(rec, d, atol=1e-5)
    with pytest.raises(ValidationError, match="no cached spectrum"):
        cache.factors("blocks.1.norm.bias")


def test_cache_counts_calls_reuses_disk_and_is_invalidated(tmp_path):
    tvs = _random_set()
    progress = []
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path, progress=lambda d, t, n: progress.append((d, t)))
    first = cache.factors("blocks.0.attn.weight")
    assert cache.compute_count == len(cache.names) and progress[-1] == (4, 4)
    again = cache.factors("blocks.0.attn.weight")
    assert cache.compute_count == len(cache.names)       # no recompute on a second call
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert cache.flush() and cache.path.is_file()       # written in the background; flush waits for it

    fresh = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    from_disk = fresh.factors("blocks.0.attn.weight")
    assert fresh.compute_count == 0                       # read from disk, not recomputed
    assert all(torch.equal(x, y) for x, y in zip(first, from_disk))

    # change one task vector: new key, recomputed, different factors
    changed = {t: {n: tvs.delta(t, n).clone() for n in tvs.param_names} for t in tvs.tasks}
    changed["b"]["blocks.1.attn.weight"][0, 0] += 1.0
    tvs2 = _set(changed)
    cache2 = SpectralCache(tvs2, device="cpu", cache_dir=tmp_path)
    assert cache2.key != cache.key
    s2 = cache2.factors("blocks.1.attn.weight")[1]
    assert cache2.compute_count == len(cache2.names)
    assert not torch.allclose(s2[1], cache.factors("blocks.1.attn.weight")[1][1])
    assert torch.allclose(s2[0], cache.factors("blocks.1.attn.weight")[1][0])  # task a unchanged


@pytest.mark.parametrize("name", ["blocks.0.attn.weight", "blocks.1.conv.weight"])
def test_a_first_look_at_one_layer_decomposes_nothing_else(tmp_path, name):
    tvs = _random_set(seed=3)
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    assert not cache.ready
    looked = cache.first_look(name)
    table = singular_values_table(cache, [name], first_look=True)
    assert cache.compute_count == 0 and not cache.ready and not cache.path.exists()
    assert set(table["param"]) == {name} and len(table) == looked.numel()
    cache.compute()
    assert cache.ready
    torch.testing.assert_close(looked, cache.singular_values(name), rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.first_look(name), cache.singular_values(name))   # the factors once they exist
    assert cache.flush()
    from_disk = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    assert from_disk.ready and from_disk.compute_count == 0


def test_no_persist_writes_nothing(tmp_path):
    cache = SpectralCache(_random_set(), device="cpu", cache_dir=tmp_path, persist=False)
    cache.compute()
    assert cache.compute_count == 4 and not list(tmp_path.iterdir())


def test_streaming_small_budget_gives_same_factors(tmp_path):
    tvs = _random_set()
    whole = SpectralCache(tvs, device="cpu", persist=False).compute()
    streamed = SpectralCache(tvs, device="cpu", persist=False, max_batch_bytes=1).compute()
    assert len(streamed.report) == 4 and len(whole.report) == 3   # one batch per parameter vs per shape
    for name in tvs.names_of_kind("matrix", "conv"):
        assert torch.allclose(whole.factors(name)[1], streamed.factors(name)[1])


def test_sum_factors_decompose_the_task_sum(tmp_path):
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    u, s, vh = cache.sum_factors("blocks.0.mlp.weight")
    assert torch.allclose((u * s) @ vh, tvs.sum()["blocks.0.mlp.weight"], atol=1e-5)
    assert cache.sum_compute_count == 1 and cache.compute_count == 0
    again = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    assert torch.equal(again.sum_factors("blocks.0.mlp.weight")[1], s) and again.sum_compute_count == 0


def test_rank_r_matrix_keeps_all_energy_at_rank_r(tmp_path):
    g = torch.Generator().manual_seed(3)
    r, m, n = 3, 30, 20
    lowrank = {t: {"layers.0.w.weight": torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)}
               for t in ("a", "b")}
    cache = SpectralCache(_set(lowrank), device="cpu", cache_dir=tmp_path)
    fr = r / n  # rank fraction giving exactly rank r (k = 20)
    df = energy_table(cache, [fr, (r - 1) / n, 1.0])
    at_r = df[df["rank_fraction"] == fr]
    assert (at_r["rank"] == r).all() and (at_r["energy"] > 1 - 1e-6).all() and (at_r["rel_error"] < 2e-3).all()
    below = df[df["rank"] == r - 1]
    assert (below["energy"] < 0.999).all()
    full = df[df["rank_fraction"] == 1.0]
    assert (full["energy"] == 1.0).all()
    assert list(df.columns[:4]) == ["param", "depth", "kind", "module"] and (df["depth"] == 0).all()


def test_tsvc_error_matches_explicit_reconstruction(tmp_path):
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    df = tsvc_error_table(cache, 0.25)
    compressed = tsvc_delta(cache, "b", 0.25)
    for name in cache.names:
        d = tvs.delta("b", name)
        explicit = float(torch.linalg.norm(d - compressed[name]) / torch.linalg.norm(d))
        row = df[(df["param"] == name) & (df["task"] == "b")].iloc[0]
        assert row["rel_error"] == pytest.approx(explicit, rel=1e-3, abs=1e-6)
        assert torch.linalg.matrix_rank(compressed[name].reshape(d.shape[0], -1)) == row["rank"]
    # vectors are kept whole
    assert torch.equal(compressed["blocks.1.norm.bias"], tvs.delta("b", "blocks.1.norm.bias"))


def test_truncation_rank_and_singular_values_table(tmp_path):
    assert truncation_rank(768, 1 / 8) == 96 and truncation_rank(768, 0.001) == 1 and truncation_rank(10, 1.0) == 10
    with pytest.raises(ValidationError, match="rank fraction"):
        truncation_rank(10, 0.0)
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    sv = singular_values_table(cache)
    assert len(sv) == 3 * (8 + 6 + 8 + 4)
    one = sv[(sv["param"] == "blocks.0.mlp.weight") & (sv["task"] == "c")]["sigma"].to_numpy()
    ref = torch.linalg.svdvals(tvs.delta("c", "blocks.0.mlp.weight").double()).numpy()
    assert one == pytest.approx(ref, rel=1e-5)
    assert set(sv["module"]) == {"attn.weight", "mlp.weight", "conv.weight"}


def test_effective_rank_known_values(tmp_path):
    assert float(effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0]))) == pytest.approx(4.0)
    assert float(effective_rank(torch.tensor([5.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert float(effective_rank(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    flat = {t: {"h.0.w.weight": torch.eye(6) * (i + 1)} for i, t in enumerate(("a", "b"))}
    df = effective_rank_table(SpectralCache(_set(flat), device="cpu", cache_dir=tmp_path))
    assert df["effective_rank"].to_numpy() == pytest.approx([6.0, 6.0])


def test_tsvc_accuracy_table_with_an_evaluator(tiny_workspace, tmp_path):
    ws = tiny_workspace
    cache = SpectralCache(ws.tvs, device="cpu", cache_dir=tmp_path)
    df = tsvc_accuracy_table(cache, ws.evaluator, [0.5, 1 / 16], split="test", tasks=["alpha", "beta"])
    assert set(df.columns) >= {"task", "rank_fraction", "metric", "value", "split", "n"}
    assert set(df["rank_fraction"]) == {1.0, 0.5, 1 / 16}
    acc = df[df["metric"] == "accuracy"].set_index(["task", "rank_fraction"])["value"]
    # rank fraction 1.0 is the fine-tuned model itself
    ref = ws.reference
    for task in ("alpha", "beta"):
        ft = ref[(ref.task == task) & (ref.model == "fine_tuned") & (ref.split == "test") & (ref.metric == "accuracy")]
        assert acc[(task, 1.0)] == pytest.approx(float(ft["value"].iloc[0]))
    # full-rank TSV-C equals the task vector: same score as the uncompressed model
    full = tsvc_accuracy_table(cache, ws.evaluator, [0.999999], tasks=["alpha"], include_full=True)
    a = full[full.metric == "accuracy"].set_index("rank_fraction")["value"]
    assert a.iloc[0] == pytest.approx(a.iloc[1])


def test_spectra_and_sti_on_the_tiny_demo(tiny_demo_workspace, tmp_path):
    """The real Evaluator and a BERT-like set from analysis.zoo.build_tiny_demo."""
    from analysis.interference import sti_table
    ws = tiny_demo_workspace
    cache = SpectralCache(ws.tvs, device="cpu", cache_dir=tmp_path)
    sti = sti_table(ws.tvs, 1 / len(ws.tvs.tasks), cache=cache)
    assert len(sti) == len(cache.names) and sti["depth"].notna().all() and (sti["sti"] > 0).all()
    task = ws.tvs.tasks[0]
    acc = tsvc_accuracy_table(cache, ws.evaluator, [0.25], split="test", tasks=[task])
    acc = acc[acc.metric == "accuracy"].set_index("rank_fraction")["value"]
    ref = ws.reference
    ft = ref[(ref.task == task) & (ref.model == "fine_tuned") & (ref.split == "test") & (ref.metric == "accuracy")]
    assert acc[1.0] == pytest.approx(float(ft["value"].iloc[0]), abs=1e-6)
    assert 0.0 <= acc[0.25] <= 1.0


def test_compute_returns_before_the_file_is_written_and_flush_waits(tmp_path, monkeypatch):
    """Persisting is off the critical path: a slow disk does not delay the factors."""
    import threading
    import analysis.spectra as spectra
    gate = threading.Event()
    real_save = spectra.atomic_save_safetensors

    def slow_save(*args, **kwargs):
        gate.wait(10)
        real_save(*args, **kwargs)

    monkeypatch.setattr(spectra, "atomic_save_safetensors", slow_save)
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute()
    assert cache.compute_count == 4 and cache.writing and not cache.path.exists()
    assert cache.flush(timeout=0.05) is False               # still blocked on the "disk"
    # a second cache object of the same set in this process waits for that write instead of recomputing
    gate.set()
    fresh = SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute()
    assert fresh.compute_count == 0 and cache.path.is_file() and cache.writes == 1
    assert cache.flush() and not cache.writing


def test_a_half_written_temp_file_is_ignored_and_a_write_error_is_not_fatal(tmp_path):
    tvs = _random_set()
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    tmp_path.mkdir(exist_ok=True)
    torn = tmp_path / f".{cache.path.name}.abc123.tmp"
    torn.write_bytes(b"\x00" * 100)                        # what a process killed mid-write leaves
    cache.compute()
    assert cache.compute_count == 4 and cache.flush()
    assert SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute().compute_count == 0
    # a cache folder that cannot be written: the factors are still there, flush reports it
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    bad = SpectralCache(_random_set(seed=5), device="cpu", cache_dir=blocked / "spectra").compute()
    assert bad.compute_count == 4
    from analysis.errors import StorageError
    with pytest.raises(StorageError, match="could not write .*svd-.*: Not a directory") as err:
        bad.flush()
    assert err.value.filename == str(bad.path)


def test_spectra_keeps_every_name_it_exported():
    import analysis.spectra as spectra
    import analysis.spectra_tables as tables
    import analysis.svd as svd
    for name in ("SpectralCache", "thin_svd", "svd_gram", "exact_svd", "factor_errors", "truncation_rank",
                 "as_matrix_batch", "low_rank", "_exact_matmul", "QR_BELOW", "METHODS", "module_of",
                 "singular_values_table", "energy_table", "tsvc_error_table", "effective_rank",
                 "effective_rank_table", "tsvc_delta", "tsvc_accuracy_table", "default_cache_dir"):
        assert hasattr(spectra, name), name
    assert spectra.thin_svd is svd.thin_svd and spectra.energy_table is tables.energy_table


def test_one_home_for_the_cache_root(monkeypatch, tmp_path):
    from analysis.paths import cache_root
    from analysis.spectra import default_cache_dir
    from analysis.zoo.builder import default_cache_dir as zoo_dir
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path))
    assert cache_root() == default_cache_dir() == zoo_dir() == tmp_path
    assert SpectralCache(_random_set(), device="cpu").cache_dir == tmp_path / "spectra"
