"""The spectral cache keeps the top K singular directions the sliders can reach
(`keep`), singular values in full: a truncated cache answers every rank
fraction up to K's exactly as full factors do, and refuses past K naming K."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from analysis.errors import ValidationError
from analysis.interference import sti_tables, subspace_alignment_table
from analysis.merging import MergeInputs, merge
from analysis.spectra import (AUTO_RANK_FRACTION, FULL_RANK_MAX, SpectralCache, energy_table, kept_rank_for,
                              parse_keep, tsvc_delta)
from analysis.taskvectors import TaskVectorSet

SHAPES = {"blocks.0.attn.weight": (24, 16), "blocks.0.mlp.weight": (16, 20), "blocks.1.attn.weight": (24, 16),
          "blocks.1.conv.weight": (6, 3, 2, 2), "blocks.1.norm.bias": (16,)}


def _set(seed: int = 0, tasks=("a", "b", "c"), shapes=SHAPES) -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
                                                 for t in tasks})


def _pair(tvs, keep=0.5):
    full = SpectralCache(tvs, device="cpu", persist=False, keep="full").compute()
    part = SpectralCache(tvs, device="cpu", persist=False, keep=keep).compute()
    return full, part


def _merged(tvs, cache, method, **knobs):
    return merge(MergeInputs(tvs, device="cpu", persist=False, spectral_cache=cache), method, **knobs)


FRACTIONS = [0.05, 1 / 3, 0.4, 0.5]      # every one <= K's fraction 0.5


def test_kept_rank_mapping():
    assert kept_rank_for(384, 8, "auto") == 384                      # MiniLM: every demo matrix keeps all
    assert kept_rank_for(FULL_RANK_MAX, 2, "auto") == FULL_RANK_MAX
    assert kept_rank_for(4096, 4, "auto") == int(AUTO_RANK_FRACTION * 4096) == 1024
    assert kept_rank_for(4096, 2, "auto") == 2048                    # 1/T when T < 4: TSV's default stays reachable
    assert kept_rank_for(4096, 8, "full") == 4096
    assert kept_rank_for(100, 3, 0.125) == 12 and kept_rank_for(5, 3, 0.01) == 1   # ⌊f·k⌋, at least 1
    for k in (7, 100, 768):                                          # every f <= f_max truncates within K
        for f_max in (0.1, 0.25, 0.5):
            assert all(max(1, int(f * k + 1e-9)) <= kept_rank_for(k, 3, f_max)
                       for f in [i / 200 * f_max for i in range(1, 201)])


def test_keep_values_and_the_environment(monkeypatch):
    assert parse_keep("full") == "full" and parse_keep(0.25) == 0.25 and parse_keep("0.5") == 0.5
    monkeypatch.delenv("MERGESCOPE_SPECTRA_KEEP", raising=False)
    assert parse_keep(None) == "auto"
    monkeypatch.setenv("MERGESCOPE_SPECTRA_KEEP", "0.3")
    assert SpectralCache(_set(), device="cpu", persist=False).keep == 0.3
    monkeypatch.setenv("MERGESCOPE_SPECTRA_KEEP", "lots")
    with pytest.raises(ValidationError, match="MERGESCOPE_SPECTRA_KEEP='lots'"):
        SpectralCache(_set(), device="cpu", persist=False)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValidationError, match="expected 'auto', 'full'"):
            parse_keep(bad)


def test_auto_keeps_small_matrices_whole_and_truncates_large_ones_from_the_shapes():
    tvs = _set()                                                     # every k <= 512: the cache is as before
    cache = SpectralCache(tvs, device="cpu", persist=False)
    assert cache.keep == "auto" and cache.keeps_everything
    assert cache.key == tvs.fingerprint(cache.names)                 # the same file name as before `keep` existed
    big = _set(tasks=("a", "b", "c", "d"), shapes={"blocks.0.big.weight": (520, 600), "blocks.0.small.weight": (8, 8)})
    cache = SpectralCache(big, device="cpu", persist=False)          # nothing decomposed: K comes from shapes
    assert cache.kept_rank("blocks.0.big.weight") == 130 and cache.rank("blocks.0.big.weight") == 520
    assert cache.keeps_all("blocks.0.small.weight") and not cache.keeps_everything
    assert cache.max_rank_fraction("blocks.0.big.weight") == 0.25 and cache.compute_count == 0


def test_truncated_factors_give_the_same_sti_for_every_fraction_up_to_k():
    tvs = _set()
    full, part = _pair(tvs)
    for f in FRACTIONS:
        a, a_pairs = sti_tables(tvs, f, cache=full)
        b, b_pairs = sti_tables(tvs, f, cache=part)
        # the same factors' values; the matmuls see a compact copy instead of a strided slice,
        # so sums may round differently in the last float32 bit
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
        pd.testing.assert_frame_equal(a_pairs, b_pairs, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(energy_table(full, [0.1, 0.9]), energy_table(part, [0.1, 0.9]))  # every σ kept
    for name in full.names:
        assert torch.equal(full.singular_values(name), part.singular_values(name))
        k = part.rank(name)
        assert part.kept_rank(name) == k // 2
        u, _, vh = part._all()[name]                                 # stored compactly: K directions, own memory
        assert u.shape[-1] == vh.shape[-2] == k // 2
        assert u.untyped_storage().nbytes() == u.numel() * 4 and vh.untyped_storage().nbytes() == vh.numel() * 4


def test_truncated_factors_give_the_same_tsv_m_and_tsv_c_up_to_k():
    tvs = _set()
    full, part = _pair(tvs)
    runs = [("tsv_m", {"rank_fraction": f, "overflow": o}) for f in FRACTIONS for o in ("cap", "polar")]
    runs += [("tsv_m", {"rank_fraction": 0.9, "overflow": "cap"}),   # the cap reads ⌊r/T⌋ <= K at any f
             ("tsv_c", {"rank_fraction": 0.25}), ("tsv_c", {"rank_fraction": 0.5})]
    for method, knobs in runs:
        a, b = _merged(tvs, full, method, **knobs), _merged(tvs, part, method, **knobs)
        for task in tvs.tasks:
            for name in tvs.param_names:
                assert torch.equal(a.for_task(task)[name], b.for_task(task)[name]), (method, knobs, name)
    delta_full, delta_part = tsvc_delta(full, "b", 0.5), tsvc_delta(part, "b", 0.5)
    assert all(torch.equal(delta_full[n], delta_part[n]) for n in delta_full)


def test_a_request_past_k_fails_naming_k():
    tvs = _set()
    _, part = _pair(tvs)
    name = "blocks.0.attn.weight"                                    # k = 16, K = 8
    with pytest.raises(ValidationError, match=r"rank fraction 0.75 needs the top 12 .* keeps the top K=8 of its 16"):
        sti_tables(tvs, 0.75, cache=part)
    with pytest.raises(ValidationError, match=r"K=8 of its 16 .*keep=0.5"):
        _merged(tvs, part, "tsv_m", rank_fraction=0.75, overflow="polar")
    with pytest.raises(ValidationError, match=r"K=\d+ of its \d+"):
        _merged(tvs, part, "tsv_c", rank_fraction=0.6)
    with pytest.raises(ValidationError, match=r"all 16 singular triplets .* K=8"):
        part.factors(name)
    with pytest.raises(ValidationError, match="the top 9 singular triplets were asked for.*K=8"):
        part.top(name, 9)
    assert part.top(name, 8)[0].shape == (3, 24, 8)


def test_methods_that_need_whole_task_matrices_read_the_deltas_past_k():
    """Iso-CTS's projected residuals and the subspace alignment ratio need all
    of τ_t: with a truncated cache they read the deltas and agree with full factors."""
    tvs = _set(seed=3)
    full, part = _pair(tvs, keep=0.25)
    for c in (0.0, 0.5, 0.8):
        a = _merged(tvs, full, "iso_cts", common_fraction=c)
        b = _merged(tvs, part, "iso_cts", common_fraction=c)
        for name in tvs.param_names:   # two float32 routes, each within 1e-5 of the definition (test_merging)
            assert float((a[name] - b[name]).norm() / a[name].norm()) < 2e-5, (c, name)
    sa, sb = subspace_alignment_table(tvs, cache=full), subspace_alignment_table(tvs, cache=part)
    pd.testing.assert_frame_equal(sa, sb, rtol=1e-6)


def test_k_is_part_of_the_key_and_a_file_with_other_k_is_refused(tmp_path):
    tvs = _set()
    half = SpectralCache(tvs, device="cpu", cache_dir=tmp_path, keep=0.5).compute()
    assert half.flush() and half.path.is_file() and half.key.startswith(half.content_key + "-top")
    again = SpectralCache(tvs, device="cpu", cache_dir=tmp_path, keep=0.5).compute()
    assert again.compute_count == 0 and again.top("blocks.0.attn.weight", 8)[0].shape[-1] == 8
    full = SpectralCache(tvs, device="cpu", cache_dir=tmp_path, keep="full")
    assert full.path != half.path and full.sum_path == half.sum_path  # the task-sum file is keyed by content only
    full.path.write_bytes(half.path.read_bytes())                   # a truncated file under the full key
    full.compute()
    assert full.compute_count == len(full.names)                     # refused (U has K columns), recomputed
    assert full.factors("blocks.0.attn.weight")[0].shape[-1] == 16


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (24, 24)])
@pytest.mark.parametrize("solver", ["exact", "subspace"])
def test_projected_residual_from_the_deltas_is_its_top_svd(shape, solver):
    """The deltas route of Iso-CTS's projected residuals (a truncated cache) against a float64 SVD of
    (I − U_cU_cᵀ)τ_t itself: the same singular values and subspaces, with G_out kept or formed per call."""
    from analysis.merging.iso import outside_parts, projected_top_of_deltas
    g = torch.Generator().manual_seed(7)
    m, n = shape
    taus = torch.randn(3, m, n, generator=g) / (1 + torch.arange(n) / 4.0)
    u_sum = torch.linalg.svd(taus.sum(0).double(), full_matrices=False)[0].float()
    for common, k in ((0, 4), (10, 3), (min(m, n) - 6, 2)):
        uc = u_sum.double()[:, :common]
        resid = taus.double() - uc @ (uc.mT @ taus.double())
        ref_u, ref_s, ref_vh = torch.linalg.svd(resid, full_matrices=False)
        kept = [None] + ([outside_parts(taus, u_sum)] if m > n else [])
        for outside in kept:
            x, sig, y_h = projected_top_of_deltas(taus, u_sum, common, k, solver, outside)
            assert x.shape == (3, m, k) and sig.shape == (3, k) and y_h.shape == (3, k, n)
            torch.testing.assert_close(sig.double(), ref_s[:, :k], rtol=1e-5, atol=1e-6)
            for got, ref in ((x.double(), ref_u[..., :k]), (y_h.double().mT, ref_vh[:, :k].mT)):
                assert float((got @ got.mT - ref @ ref.mT).norm()) < 1e-4, (common, k, outside is None)
            rebuilt = (x.double() * sig.double()[:, None, :]) @ y_h.double()
            best = (ref_u[..., :k] * ref_s[:, None, :k]) @ ref_vh[:, :k]
            assert float((rebuilt - best).norm() / best.norm()) < 1e-5


def test_a_resident_set_keeps_the_outside_parts_of_its_tall_matrices():
    tvs = _set(seed=3)
    tvs.keep_resident()
    _, part = _pair(tvs, keep=0.25)
    inputs = MergeInputs(tvs, device="cpu", persist=False, spectral_cache=part)
    merge(inputs, "iso_cts", common_fraction=0.5)
    kept = {k[1] for k in inputs.memo if isinstance(k, tuple) and k[0] == "iso_cts_outside"}
    assert kept == {"blocks.0.attn.weight", "blocks.1.attn.weight"}                # the tall ones
    moved = merge(inputs, "iso_cts", common_fraction=0.3)                            # reads the kept W, G_out
    streaming = _set(seed=3)                                                         # not resident: formed per call
    _, part_s = _pair(streaming, keep=0.25)
    plain = merge(MergeInputs(streaming, device="cpu", persist=False, spectral_cache=part_s), "iso_cts",
                  common_fraction=0.3)
    for name in moved:
        torch.testing.assert_close(moved[name], plain[name], rtol=1e-5, atol=1e-6)
