"""The polar factor: exact definition, the Newton–Schulz fast path against it."""
from __future__ import annotations

import pytest
import torch

from analysis.merging.polar import polar, polar_exact, polar_gram, polar_newton_schulz


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(40, 40), (60, 24), (24, 60), (3, 50, 20)])
def test_exact_polar_is_orthonormal_and_nearest(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = polar_exact(x)
    m, p = shape[-2:]
    eye = torch.eye(min(m, p))
    gram = w.mT @ w if m >= p else w @ w.mT       # orthonormal columns (tall) or rows (wide)
    torch.testing.assert_close(gram, eye.expand_as(gram), rtol=0, atol=1e-5)
    # nearest: no other orthonormal matrix we try is closer (random orthonormal perturbations)
    best = (x - w).norm()
    for seed in range(5):
        q = polar_exact(w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
        assert float((x - q).norm()) >= float(best) - 1e-5


def test_polar_of_an_orthonormal_matrix_is_itself():
    q, _ = torch.linalg.qr(torch.randn(30, 12))
    torch.testing.assert_close(polar_exact(q), q, rtol=0, atol=1e-5)
    torch.testing.assert_close(polar_newton_schulz(q), q, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fail", ["float32", "always"])
@pytest.mark.parametrize("shape", [(40, 16), (16, 40), (3, 30, 30)])
def test_exact_polar_survives_an_svd_that_does_not_converge(monkeypatch, fail, shape):
    """LAPACK's SVD can raise LinAlgError on nearly repeated singular values (it did on
    Iso-CTS's V* at 12 ViT blocks); the answer must not change when it does."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = polar_exact(x)
    svd = torch.linalg.svd

    def flaky_svd(a, *args, **kwargs):
        if fail == "always" or a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    got = polar_exact(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel(got, want) < 1e-5


def test_gram_fallback_gives_a_polar_factor_for_rank_deficient_input(monkeypatch):
    a = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    x = a @ torch.randn(3, 10, generator=torch.Generator().manual_seed(3))  # rank 3, tall 30 x 10
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    w = polar_exact(x)
    torch.testing.assert_close(w.mT @ w, torch.eye(10), rtol=0, atol=1e-5)   # orthonormal columns
    # x = W H with H = Wᵀx symmetric positive semidefinite: W is a polar factor (not unique at rank 3)
    h = (w.mT @ x).double()
    torch.testing.assert_close(h, h.mT, rtol=0, atol=1e-4)
    assert float(torch.linalg.eigvalsh(h).min()) > -1e-4
    torch.testing.assert_close(w @ (w.mT @ x), x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (4, 48, 40)])
def test_newton_schulz_matches_exact_within_1e_4(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    fast, info = polar_newton_schulz(x, return_info=True)
    assert info["fallback"] == 0
    assert rel(fast, polar_exact(x)) <= 1e-4


def test_newton_schulz_on_concatenated_task_bases():
    # the TSV-M case: T blocks of orthonormal columns, overlapping subspaces
    g = torch.Generator().manual_seed(2)
    blocks = [torch.linalg.qr(torch.randn(64, 8, generator=g))[0] for _ in range(6)]
    u = torch.cat(blocks, dim=1)                   # 64 × 48, singular values in (0, √6)
    fast, info = polar_newton_schulz(u, return_info=True)
    assert info["fallback"] == 0
    assert rel(fast, polar_exact(u)) <= 1e-4


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (4, 48, 40)])
def test_gram_route_matches_exact_within_1e_5(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    w, info = polar_gram(x, return_info=True)
    assert info["fallback"] == 0
    assert rel(w, polar_exact(x)) <= 1e-5


def test_newton_schulz_falls_back_when_rank_deficient():
    # duplicated columns: a zero singular value, the iteration cannot converge there
    q, _ = torch.linalg.qr(torch.randn(20, 5))
    x = torch.stack([torch.cat([q, q], 1), torch.randn(20, 10)])
    out, info = polar_newton_schulz(x, return_info=True)
    assert info["fallback"] == 1
    torch.testing.assert_close(out[0], polar_exact(x[0]))
    assert rel(out[1], polar_exact(x[1])) <= 1e-4
    out, info = polar_gram(x, return_info=True)
    assert info["fallback"] == 1
    torch.testing.assert_close(out[0], polar_exact(x[0]))


def test_auto_solver_and_errors():
    x = torch.randn(10, 6)
    torch.testing.assert_close(polar(x, "auto"), polar_gram(x))      # CPU: the Gram route
    torch.testing.assert_close(polar(x, "exact"), polar_exact(x))
    with pytest.raises(ValueError, match="bogus"):
        polar(x, "bogus")


# ------------------------------------------------------------ tensor cores, emulated on the CPU
def _truncating_tf32(a, b):
    """What a TF32 tensor core does with float32 operands: keep 10 mantissa bits, accumulate in float32."""
    trunc = lambda t: (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)  # noqa: E731
    return trunc(a) @ trunc(b)


def _tsv_bases(m=192, tasks=8, seed=4):
    """TSV-M's U: each task's top m/T left singular vectors, concatenated (square, κ in the thousands)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(tasks):
        a = torch.randn(m, m, generator=g) * (1.0 / (1.0 + torch.arange(m) / 32.0)) @ torch.randn(m, m, generator=g)
        blocks.append(torch.linalg.svd(a, full_matrices=False)[0][:, : m // tasks])
    return torch.cat(blocks, 1)


@pytest.mark.parametrize("case", ["tsv_bases", "random", "wide"])
def test_tf32x3_newton_schulz_stays_within_1e_4_on_emulated_tensor_cores(monkeypatch, case):
    import analysis.merging.polar as polar_module
    x = {"tsv_bases": _tsv_bases(), "random": torch.randn(4, 80, 48, generator=torch.Generator().manual_seed(5)),
         "wide": torch.randn(40, 96, generator=torch.Generator().manual_seed(6))}[case]
    exact = polar_exact(x)
    monkeypatch.setattr(polar_module, "_tensor_core_matmul", _truncating_tf32)
    fast, info = polar_newton_schulz(x, precision="tf32x3", return_info=True)
    assert info["fallback"] == 0 and info["precision"] == "tf32x3"
    assert info["steps"] <= 15                                    # bounded: 7 quintic + a few cubic steps
    assert rel(fast, exact) <= 1e-5
    # a single TF32 product per matmul is what the split avoids: 100x off
    monkeypatch.setattr(polar_module, "_float32_matmul", _truncating_tf32)
    plain = polar_newton_schulz(x, precision="float32", max_cubic_steps=12)
    assert rel(plain, exact) > 1e-4


def test_tf32x3_matmul_is_float32_accurate():
    import analysis.merging.polar as polar_module
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 32, generator=g)
    ref = (a.double() @ b.double())
    err = lambda c: float((c.double() - ref).norm() / ref.norm())  # noqa: E731
    saved = polar_module._tensor_core_matmul
    try:
        polar_module._tensor_core_matmul = _truncating_tf32
        assert err(polar_module.tf32x3_matmul(a, b)) < 1e-6 < err(_truncating_tf32(a, b))
    finally:
        polar_module._tensor_core_matmul = saved


def test_newton_schulz_is_scale_invariant_and_bounded():
    x = _tsv_bases(m=96, tasks=4, seed=8)
    exact = polar_exact(x)
    for scale in (1e-6, 1.0, 1e6):
        w, info = polar_newton_schulz(x * scale, return_info=True)
        assert info["fallback"] == 0 and info["steps"] <= 7 + 30
        assert rel(w, exact) <= 1e-5
    with pytest.raises(ValueError, match="precision"):
        polar_newton_schulz(x, precision="bfloat16")


@pytest.mark.parametrize("m", [120, 60])   # Y (Q Λ^(-1/2) Qᵀ), and ((Y Q) Λ^(-1/2)) Qᵀ for m < 2p
def test_inverse_sqrt_is_applied_in_float32_only_where_the_gram_is_well_conditioned(m):
    """Y = Q diag(d) Rᵀ (held in float32) has polar factor ≈ Q Rᵀ; with κ(YᵀY) = 1e2 the float32 product
    is within 1e-6 of the float64 polar factor, and with κ = 1e10 (past FLOAT32_APPLY_MAX_KAPPA) the
    directions past the cap are taken in float64 and the whole is within 1e-5 (a whole float32 product
    would be off by ~√κ·6e-8 there, 6e-3)."""
    from analysis.merging.polar import FLOAT32_APPLY_MAX_KAPPA, times_inverse_sqrt
    g = torch.Generator().manual_seed(11)
    p = 40
    q = torch.linalg.qr(torch.randn(2, m, p, generator=g, dtype=torch.float64))[0]
    r = torch.linalg.qr(torch.randn(2, p, p, generator=g, dtype=torch.float64))[0]
    d = torch.stack([torch.logspace(0, -1, p, dtype=torch.float64), torch.logspace(0, -5, p, dtype=torch.float64)])
    y = ((q * d[:, None, :]) @ r.mT).float().double()     # the float32 input the merges hold
    evals, evecs = torch.linalg.eigh(y.mT @ y)
    kappa = evals[:, -1] / evals[:, 0]
    assert kappa[0] < FLOAT32_APPLY_MAX_KAPPA < kappa[1]
    w = times_inverse_sqrt(y.float(), evals, evecs)
    assert w.dtype == torch.float32 and w.shape == (2, m, p)
    pu, _, pvh = torch.linalg.svd(y, full_matrices=False)
    truth = pu @ pvh                                        # float64 polar factor of that input
    torch.testing.assert_close(truth[0], q[0] @ r[0].mT, rtol=0, atol=1e-6)
    for i, bound in enumerate((1e-6, 1e-5)):
        assert float((w[i].double() - truth[i]).norm() / truth[i].norm()) < bound, i
