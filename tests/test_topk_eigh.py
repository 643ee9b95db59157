"""analysis.svd.top_k_eigh (block subspace iteration for the top eigenpairs) and its use in Iso-CTS."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.device import get_device
from analysis.svd import top_k_eigh

DEVICE = get_device()


def _psd(b: int, n: int, lam: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    return ((q * lam) @ q.mT).to(DEVICE), q.to(DEVICE)


def _subspace_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖A Aᵀ − B Bᵀ‖_F / √(2k) for orthonormal n×k bases (0: the same subspace)."""
    k = a.shape[-1]
    return float(((a @ a.mT - b @ b.mT).norm(dim=(-2, -1)) / math.sqrt(2 * k)).max())


@pytest.mark.parametrize("k", [5, 19, 40])
def test_top_eigenpairs_of_matrices_with_known_spectra(k):
    n = 256
    lam = (1.0 / (1.0 + torch.arange(n, dtype=torch.float64) / 32.0)) ** 2     # a fine-tuning-like decay
    g, q = _psd(3, n, lam)
    vals, vecs, info = top_k_eigh(g, k, return_info=True)
    assert info["route"] == "subspace" and info["fallback"] == 0
    assert vals.shape == (3, k) and vecs.shape == (3, n, k)
    torch.testing.assert_close(vals.cpu(), lam[:k].expand(3, k), rtol=1e-12, atol=1e-14)
    assert _subspace_error(vecs, q[..., :k]) < 1e-6
    torch.testing.assert_close((vecs.mT @ vecs).cpu(), torch.eye(k, dtype=torch.float64).expand(3, k, k),
                               atol=1e-10, rtol=0)


def test_small_or_wide_problems_take_the_full_eigh():
    lam = torch.linspace(2.0, 0.1, 48, dtype=torch.float64)
    g, q = _psd(2, 48, lam)
    vals, vecs, info = top_k_eigh(g, 4, return_info=True)
    assert info["route"] == "exact"
    torch.testing.assert_close(vals.cpu(), lam[:4].expand(2, 4))
    lam = torch.linspace(2.0, 0.1, 200, dtype=torch.float64)
    assert top_k_eigh(_psd(1, 200, lam)[0], 90, return_info=True)[2]["route"] == "exact"   # k + p ≥ n/2


def test_a_matrix_that_does_not_converge_in_time_is_solved_exactly_the_others_are_not():
    n, k = 256, 10
    easy = torch.cat([torch.full((k,), 10.0), torch.full((n - k,), 1e-3)]).double()     # a huge gap
    hard = (1.0 / (1.0 + torch.arange(n, dtype=torch.float64))) ** 0.01                # almost flat: a tiny gap
    g_easy, q_easy = _psd(1, n, easy, seed=1)
    g_hard, q_hard = _psd(1, n, hard, seed=2)
    vals, vecs, info = top_k_eigh(torch.cat([g_easy, g_hard]), k, max_iters=3, check_every=3, return_info=True)
    assert info["fallback"] == 1
    ref_vals, ref_vecs = torch.linalg.eigh(g_hard[0])
    torch.testing.assert_close(vals[1], ref_vals.flip(-1)[:k])
    assert _subspace_error(vecs[1:], ref_vecs.flip(-1)[None, :, :k]) < 1e-8
    assert _subspace_error(vecs[:1], q_easy[..., :k]) < 1e-8


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="0 < k <= n"):
        top_k_eigh(torch.eye(8, dtype=torch.float64, device=DEVICE), 9)


def _set(n_tasks=4):
    from analysis.taskvectors import TaskVectorSet
    g = torch.Generator().manual_seed(3)
    # at c = 0.5 every Gram is past 128 (a CPU's full-eigh cutoff), so the iteration runs on each
    shapes = {"tall.weight": (360, 288), "wide.weight": (288, 576), "square.weight": (288, 288)}
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    decay = {k: 1.0 / (1.0 + torch.arange(min(s)) / 8.0) for k, s in shapes.items()}
    tasks = {f"t{i}": {k: (torch.randn(s[0], min(s), generator=g) * decay[k]) @ torch.randn(min(s), s[1], generator=g)
                       / s[1] for k, s in shapes.items()} for i in range(n_tasks)}
    return TaskVectorSet.from_state_dicts(base, tasks)


@pytest.fixture(scope="module")
def iso_set():
    from analysis.spectra import SpectralCache
    tvs = _set()
    return tvs, SpectralCache(tvs, device=DEVICE, persist=False, keep="full").compute()


@pytest.mark.parametrize("c", [0.5, 0.8, 0.95])
def test_iso_cts_with_subspace_iteration_is_the_full_routes_merge(c, iso_set):
    from analysis.merging import merge
    from analysis.merging.iso import projected_top, split_rank
    tvs, cache = iso_set
    exact = merge(tvs, "iso_cts", common_fraction=c, cache=cache, topk="exact")
    fast = merge(tvs, "iso_cts", common_fraction=c, cache=cache, topk="subspace")
    for name in tvs.param_names:
        a, b = fast[name].double().cpu(), exact[name].double().cpu()
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()), name
    # the subspace route against a float64 reference of the projected residuals' top triplets
    for name in tvs.param_names:
        u, s, vh = cache.factors(name)
        u_sum = cache.sum_factors(name)[0]
        common, k = split_rank(min(u.shape[1], vh.shape[2]), len(tvs.tasks), c)
        x, sig, _ = projected_top(u, s, vh, u_sum, common, k, "subspace")
        tau = (u.double() * s.double()[:, None, :]) @ vh.double()
        uc = u_sum.double()[:, :common]
        ref_u, ref_s, _ = torch.linalg.svd(tau - uc @ (uc.mT @ tau), full_matrices=False)
        assert _subspace_error(x.double(), ref_u[..., :k]) < 1e-5, name
        torch.testing.assert_close(sig.double(), ref_s[..., :k], rtol=1e-5, atol=1e-9)
        if c == 0.5:   # the iteration itself ran (not its full-eigh shortcut) on every Gram here
            b = tau - uc @ (uc.mT @ tau)
            gram = b.mT @ b if b.shape[-2] > b.shape[-1] else (u_sum.double()[:, common:].mT @ b) @ (
                u_sum.double()[:, common:].mT @ b).mT
            assert top_k_eigh(gram, k, return_info=True)[2]["route"] == "subspace", name


def test_an_unknown_topk_solver_is_refused():
    from analysis.errors import HyperparameterError
    from analysis.merging import merge
    with pytest.raises(HyperparameterError, match="top-k solver 'lanczos'"):
        merge(_set(), "iso_cts", topk="lanczos")


def test_a_repeated_kth_eigenvalue_goes_to_the_fallback_and_a_zero_matrix_does_not():
    n, k = 200, 12
    lam = (1.0 / (1.0 + torch.arange(n, dtype=torch.float64) / 16.0)) ** 2
    lam[k] = lam[k - 1]                                   # λ_k = λ_{k+1}: the top-k subspace is not defined
    g, _ = _psd(1, n, lam, seed=4)
    easy, q_easy = _psd(1, n, (1.0 / (1.0 + torch.arange(n, dtype=torch.float64) / 4.0)) ** 2, seed=5)
    zero = torch.zeros(1, n, n, dtype=torch.float64, device=DEVICE)
    vals, vecs, info = top_k_eigh(torch.cat([g, easy, zero]), k, return_info=True)
    # the repeated one falls back (on the 2-core CPU it alone; the H100 sent the easy one too: open)
    assert info["route"] == "subspace" and info["fallback"] >= 1
    ref_vals, ref_vecs = torch.linalg.eigh(g[0])
    torch.testing.assert_close(vals[0], ref_vals.flip(-1)[:k])               # eigh's answer: the k - 1 defined
    assert _subspace_error(vecs[:1, :, :k - 1], ref_vecs.flip(-1)[None, :, :k - 1]) < 1e-8   # directions, plus
    assert float((g[0] @ vecs[0] - vecs[0] * vals[0]).norm()) < 1e-10        # an eigenvector of the repeated value
    assert _subspace_error(vecs[1:2], q_easy[..., :k]) < 1e-6
    assert float(vals[2].abs().max()) == 0.0
    torch.testing.assert_close((vecs[2].mT @ vecs[2]).cpu(), torch.eye(k, dtype=torch.float64))


def test_batched_projected_top_is_each_parameters_own():
    # Iso-CTS decomposes every parameter of a shape-group run in one call (leading dims)
    from analysis.merging.iso import projected_top, task_projections
    g = torch.Generator().manual_seed(6)
    for m, n in ((200, 120), (120, 200)):
        taus = torch.randn(2, 3, m, n, generator=g).to(DEVICE)      # 2 parameters, 3 tasks
        u_t, s_t, vh_t = torch.linalg.svd(taus, full_matrices=False)
        u_sum = torch.linalg.svd(taus.sum(1), full_matrices=False)[0]
        proj = task_projections(u_t, s_t, u_sum)
        for solver in ("exact", "subspace"):
            both = projected_top(u_t, s_t, vh_t, u_sum, 60, 20, solver)
            # the merge's own call: projections kept, factors passed as one tensor per parameter (no stack)
            listed = projected_top(list(u_t), s_t, list(vh_t), u_sum, 60, 20, solver, proj)
            for a, b in zip(both, listed):
                torch.testing.assert_close(a.abs(), b.abs(), rtol=1e-4, atol=1e-5)   # up to signs
            for i in range(2):
                one = projected_top(u_t[i], s_t[i], vh_t[i], u_sum[i], 60, 20, solver)
                torch.testing.assert_close(both[1][i], one[1], rtol=1e-5, atol=1e-6)      # σ
                x, sig, yh = both                                                              # X Σ Yᵀ: signs cancel
                torch.testing.assert_close((x[i] * sig[i][:, None, :]) @ yh[i], (one[0] * one[1][:, None, :]) @ one[2],
                                           rtol=1e-4, atol=1e-5)


def test_batched_eigh_splits_a_cpu_batch_over_one_thread_workers_and_changes_nothing_else():
    from analysis.svd import batched_eigh
    g = torch.Generator().manual_seed(0)
    for lead in ((5,), (2, 3), (1,)):
        a = torch.randn(*lead, 12, 12, generator=g, dtype=torch.float64)
        a = a @ a.mT
        threads = torch.get_num_threads()
        vals, vecs = batched_eigh(a)
        assert torch.get_num_threads() == threads
        ref_vals, _ = torch.linalg.eigh(a)
        torch.testing.assert_close(vals, ref_vals, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((vecs * vals.unsqueeze(-2)) @ vecs.mT, a, rtol=1e-10, atol=1e-9)


def test_the_eigh_workers_leave_new_threads_their_usual_thread_count():
    """torch.set_num_threads(1) in a worker also sets the default of every thread started later; the
    pool puts the caller's count back, so a page's next script thread still gets every core."""
    import threading

    from analysis.svd import batched_eigh
    a = torch.eye(4, dtype=torch.float64).expand(3, 4, 4).clone()
    threads = torch.get_num_threads()
    batched_eigh(a)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [threads] and torch.get_num_threads() == threads


def test_the_eigh_workers_are_only_started_at_the_processs_own_niceness(monkeypatch):
    """A background merge (nice 10) that is the first to need the workers solves its eighs itself, so the
    workers a page's merge uses later are not left at nice 10; once started, the workers serve it too."""
    import threading

    import analysis.svd as svd
    from threadnice import thread_nice
    from ui.jobs import lower_priority
    mine = thread_nice()
    if mine is None or mine > 16:
        pytest.skip("needs Linux's per-thread niceness, with room to lower it")
    monkeypatch.setattr(svd, "_EIGH_POOL", None)
    a = torch.randn(4, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a @ a.mT
    seen = {}

    def background():
        lower_priority(3)
        seen["pool"] = svd._eigh_pool(2)
        seen["vals"] = svd.batched_eigh(a)[0]
        seen["still none"] = svd._EIGH_POOL is None
    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["pool"] is None and seen["still none"]
    torch.testing.assert_close(seen["vals"], torch.linalg.eigh(a)[0], rtol=1e-10, atol=1e-10)
    pool = svd._eigh_pool(2)
    assert sorted({f.result() for f in [pool.submit(thread_nice) for _ in range(8)]}) == [mine]

    def background_after():
        lower_priority(3)
        seen["pool after"] = svd._eigh_pool(2)
    t = threading.Thread(target=background_after)
    t.start()
    t.join()
    assert seen["pool after"] is pool
    pool.shutdown()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_eigh_exact_takes_only_the_top_k_by_mrrr_on_a_cpu_with_the_full_eighs_answer(dtype):
    from analysis.svd import _mrrr_pays, batched_eigh, top_eigh_exact
    n, k = 300, 12
    lam = (1.0 / (1.0 + torch.arange(n, dtype=torch.float64) / 32.0)) ** 2
    g, q = _psd(6, n, lam, seed=8)
    g = g.cpu().to(dtype).reshape(2, 3, n, n)
    assert _mrrr_pays(g, k) and not _mrrr_pays(g[..., :120, :120], 2)
    # over the worker threads up to k = n/5 from n = 256 (benchmarks/mrrr_threads.py); one matrix at a time n/12
    assert _mrrr_pays(g, n // 5) == (torch.get_num_threads() >= 2) and not _mrrr_pays(g, n // 4)
    assert not _mrrr_pays(g[0, 0], n // 10) and _mrrr_pays(g[0, 0], n // 12)
    vals, vecs = top_eigh_exact(g, k)
    assert vals.shape == (2, 3, k) and vecs.shape == (2, 3, n, k) and vals.dtype == vecs.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(vals.double(), lam[:k].expand(2, 3, k), rtol=tol, atol=tol)
    assert _subspace_error(vecs.double().reshape(6, n, k), q.cpu()[..., :k]) < (1e-9 if dtype == torch.float64 else 1e-3)
    ref_vals, ref_vecs = batched_eigh(g)
    torch.testing.assert_close(vals, ref_vals.flip(-1)[..., :k])
    # each vector the full eigh's up to its sign
    signs = torch.sign((vecs * ref_vecs.flip(-1)[..., :k]).sum(-2, keepdim=True))
    torch.testing.assert_close(vecs * signs, ref_vecs.flip(-1)[..., :k], atol=tol * 1e3, rtol=0)


def test_top_eigh_exact_of_a_non_finite_matrix_is_the_full_eighs_answer():
    from analysis.svd import top_eigh_exact
    g = torch.eye(300, dtype=torch.float64).expand(2, 300, 300).clone()
    g[1, 5, 7] = g[1, 7, 5] = float("nan")
    vals, vecs = top_eigh_exact(g, 10)               # scipy refuses it; torch's eigh answers (NaN where due)
    ref_vals, ref_vecs = torch.linalg.eigh(g)
    torch.testing.assert_close(vals, ref_vals.flip(-1)[..., :10], equal_nan=True)


def test_iso_cts_on_a_cpu_takes_mrrr_for_its_tall_grams_and_gives_the_subspace_routes_merge(monkeypatch):
    import analysis.svd as svd
    from analysis.merging import merge
    from analysis.spectra import SpectralCache
    from analysis.taskvectors import TaskVectorSet
    g = torch.Generator().manual_seed(9)
    m, n = 600, 300                                  # r = 300, c = 0.8: 20 per task, 12·20 ≤ 300
    decay = 1.0 / (1.0 + torch.arange(n) / 16.0)
    tasks = {f"t{i}": {"tall.weight": (torch.randn(m, n, generator=g) * decay) @ torch.randn(n, n, generator=g) / n}
             for i in range(3)}
    tvs = TaskVectorSet.from_state_dicts({"tall.weight": torch.zeros(m, n)}, tasks)
    cache = SpectralCache(tvs, device="cpu", persist=False, keep="full").compute()
    calls = []
    real = svd._top_eigh_mrrr
    monkeypatch.setattr(svd, "_top_eigh_mrrr", lambda a, k: calls.append(a.shape) or real(a, k))
    auto = merge(tvs, "iso_cts", common_fraction=0.8, cache=cache, device="cpu")
    assert [tuple(s) for s in calls] == [(1, 3, n, n)]    # one parameter, three tasks
    sub = merge(tvs, "iso_cts", common_fraction=0.8, cache=cache, device="cpu", topk="subspace")
    a, b = auto["tall.weight"].double(), sub["tall.weight"].double()
    assert float((a - b).norm()) <= 1e-5 * float(b.norm())


def test_times_each_task_is_the_broadcast_product():
    from analysis.merging.iso import times_each_task
    g = torch.Generator().manual_seed(12)
    for left_shape, right_shape in (((30, 7), (4, 7, 3)), ((2, 30, 7), (2, 4, 7, 3)), ((30, 7), (1, 7, 1))):
        left, right = torch.randn(left_shape, generator=g), torch.randn(right_shape, generator=g)
        expected = left.unsqueeze(-3) @ right
        got = times_each_task(left, right)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected)
