"""TSV-M's Gram eighs in float32 where κ allows (`analysis.merging.tsv.nested_gram_eigh`).

Known by construction: Grams with a chosen spectrum, so κ is known, and the rule's decision (float32 proven
by a record at a larger rank, float64 proven by one at a smaller rank, a float32 try that falls back) is
visible as the dtypes handed to the eigh; and a TSV-M merge moved across ranks, against the same moves with
every eigh in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

import analysis.merging.tsv as tsv
from analysis.merging import merge
from analysis.merging.inputs import MergeInputs
from analysis.taskvectors import TaskVectorSet

N = 300   # above FLOAT32_EIGH_MIN_SIZE


def gram_with_kappa(kappa: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, math.log10(kappa), N, dtype=torch.float64)
    return (q * evals) @ q.mT


@pytest.fixture
def eigh_dtypes(monkeypatch):
    """The dtype of every batch handed to batched_eigh, with its size."""
    calls = []
    real = tsv.batched_eigh

    def spy(a):
        calls.append((a.dtype, a.shape[0]))
        return real(a)
    monkeypatch.setattr(tsv, "batched_eigh", spy)
    return calls


def assert_eigh_of(g: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, tol: float) -> None:
    ref_vals, _ = torch.linalg.eigh(g)
    assert evals.dtype == evecs.dtype == torch.float64
    torch.testing.assert_close(evals, ref_vals, rtol=tol, atol=tol * float(ref_vals[-1]))
    torch.testing.assert_close((evecs * evals) @ evecs.mT, g, rtol=0, atol=tol * float(ref_vals[-1]))


def test_a_gram_never_seen_takes_float64_and_is_recorded(eigh_dtypes):
    g = gram_with_kappa(50.0, 0)
    seen = [{}]
    evals, evecs = tsv.nested_gram_eigh(seen, g[None], q=10)
    assert eigh_dtypes == [(torch.float64, 1)]
    assert seen[0][10] == pytest.approx(50.0, rel=1e-9)
    assert_eigh_of(g, evals[0], evecs[0], 1e-12)


def test_interlacing_decides_float32_from_a_larger_rank_and_float64_from_a_smaller_one(eigh_dtypes):
    low, high = gram_with_kappa(50.0, 1), gram_with_kappa(5e4, 2)
    bound = tsv.FLOAT32_EIGH_MAX_KAPPA
    # record at a larger rank within the bound: κ here is at most that, so float32 without a check
    seen = [{12: 0.9 * bound}, {8: 2 * bound}]     # and for the second, a smaller rank past it: float64
    evals, evecs = tsv.nested_gram_eigh(seen, torch.stack([low, high]), q=10)
    assert eigh_dtypes == [(torch.float32, 1), (torch.float64, 1)]
    assert_eigh_of(low, evals[0], evecs[0], 1e-5)          # float32's accuracy at κ = 50
    assert_eigh_of(high, evals[1], evecs[1], 1e-12)
    assert seen[0][10] == pytest.approx(50.0, rel=1e-3) and seen[1][10] == pytest.approx(5e4, rel=1e-9)


def test_a_float32_try_past_the_bound_falls_back_to_float64(eigh_dtypes):
    g = gram_with_kappa(5e3, 3)                     # past the bound
    seen = [{20: 3 * tsv.FLOAT32_EIGH_MAX_KAPPA}]   # a larger rank, not within the bound, near enough to try
    evals, evecs = tsv.nested_gram_eigh(seen, g[None], q=10)
    assert eigh_dtypes == [(torch.float32, 1), (torch.float64, 1)]
    assert_eigh_of(g, evals[0], evecs[0], 1e-12)
    assert seen[0][10] == pytest.approx(5e3, rel=1e-9)


def test_a_far_record_and_a_small_gram_take_float64(eigh_dtypes):
    g = gram_with_kappa(50.0, 4)
    tsv.nested_gram_eigh([{30: 1e7}], g[None], q=10)                  # nearest record far past the bound
    small = g[:100, :100]
    tsv.nested_gram_eigh([{30: 10.0}], small[None], q=10)             # below FLOAT32_EIGH_MIN_SIZE
    assert eigh_dtypes == [(torch.float64, 1), (torch.float64, 1)]


def test_tsv_m_rank_moves_match_float64_eighs(monkeypatch, eigh_dtypes):
    """A page's moves 1/T → lower ranks → back up (T = 4, 600-row matrices of rank 600: Grams of 4q × 4q,
    κ from ~60 to past the bound) are within 2e-5 of the same moves with every eigh in float64, and take
    both dtypes. The recorded κ never decreases with the rank (Cauchy interlacing)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.0.w": (600, 600), "blocks.1.w": (640, 600)}
    decay = 1.0 / (1.0 + torch.arange(600) / 32.0)
    deltas = {f"t{i}": {k: 1e-2 * (torch.randn(m, 600, generator=g) * decay) @ torch.randn(600, n, generator=g) / 600
                        for k, (m, n) in shapes.items()} for i in range(4)}
    tvs = TaskVectorSet.from_state_dicts({k: torch.zeros(s) for k, s in shapes.items()}, deltas)
    fractions = [0.25, 0.15, 0.14, 0.18, 0.2, 0.22, 0.16]

    def moves(bound: float):
        monkeypatch.setattr(tsv, "FLOAT32_EIGH_MAX_KAPPA", bound)
        inputs = MergeInputs(tvs, device="cpu", persist=False)
        return inputs, [{k: v.clone() for k, v in merge(inputs, "tsv_m", rank_fraction=f, polar="gram").items()}
                        for f in fractions]

    _, exact = moves(0.0)                      # κ ≥ 1 > 0: every eigh float64
    assert {d for d, _ in eigh_dtypes} == {torch.float64}
    eigh_dtypes.clear()
    inputs, fast = moves(500.0)
    assert any(d == torch.float32 for d, _ in eigh_dtypes) and any(d == torch.float64 for d, _ in eigh_dtypes)
    for f, a, b in zip(fractions, exact, fast):
        for name in shapes:
            rel = float((a[name] - b[name]).norm() / a[name].norm())
            assert rel <= 2e-5, (f, name, rel)
    records = [v for k, v in inputs.memo.items() if isinstance(k, tuple) and k[0] == "tsv_m_kappa"]
    assert len(records) == 4
    for rec in records:
        kappas = [rec[q] for q in sorted(rec)]
        assert all(a <= b * (1 + 1e-3) for a, b in zip(kappas, kappas[1:])), rec
