"""The GIL-free ?syevr binding (analysis/lapack.py) against scipy.linalg.eigh, and its use in svd."""
import threading

import numpy as np
import pytest
import scipy.linalg
import torch

from analysis.lapack import one_blas_thread, syevr_available, syevr_top


def _spd(n: int, seed: int, dtype) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, n))
    return (a @ a.T).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_syevr_top_is_scipys_evr_answer_and_leaves_its_input_alone(dtype):
    assert syevr_available(dtype)
    n, k = 120, 9
    a = _spd(n, 1, dtype)
    before = a.copy()
    w, v = syevr_top(a, k)
    ref_w, ref_v = scipy.linalg.eigh(a, subset_by_index=(n - k, n - 1), driver="evr")
    assert w.dtype == v.dtype == dtype and w.shape == (k,) and v.shape == (n, k)
    np.testing.assert_array_equal(a, before)
    np.testing.assert_array_equal(w, ref_w)          # the same LAPACK routine, the same arguments
    np.testing.assert_array_equal(v, ref_v)
    tol = 1e-9 if dtype == np.float64 else 1e-2
    np.testing.assert_allclose(a.astype(np.float64) @ v, v * w, atol=tol * float(w[-1]))


def test_syevr_top_refuses_non_finite_input_and_bad_k_by_name():
    a = _spd(20, 2, np.float64)
    a[3, 4] = a[4, 3] = np.nan
    with pytest.raises(ValueError, match="infs or NaNs"):
        syevr_top(a, 3)
    with pytest.raises(ValueError, match="k=0"):
        syevr_top(_spd(20, 2, np.float64), 0)
    assert not syevr_available(np.int64) and syevr_top(np.eye(3, dtype=np.int64), 1) is None


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_one_blas_thread_sets_one_thread_for_one_holder_and_restores_it_on_the_same_thread():
    before = _blas_threads()
    seen = {}

    def second():
        with one_blas_thread() as alone:
            seen["second"] = alone

    with one_blas_thread() as alone:
        seen["first"], seen["inside"] = alone, _blas_threads()
        t = threading.Thread(target=second)   # while the first holds it: told so, nothing changed
        t.start()
        t.join(10)
        seen["still"] = _blas_threads()
    assert seen["first"] is True and seen["second"] is False
    assert set(seen["inside"]) == {1} and set(seen["still"]) == {1}
    assert _blas_threads() == before
    with one_blas_thread() as alone:                  # free again
        assert alone is True


def test_top_eigh_mrrr_over_the_worker_pool_is_the_one_at_a_time_answer(monkeypatch):
    import analysis.svd as svd
    n, k = 260, 20
    g = torch.from_numpy(np.stack([_spd(n, s, np.float64) for s in range(5)])).reshape(5, n, n)
    if torch.get_num_threads() < 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads, real = set(), svd.syevr_top
    monkeypatch.setattr(svd, "syevr_top", lambda a, k: threads.add(threading.current_thread().name) or real(a, k))
    pooled = svd._top_eigh_mrrr(g, k)
    assert len(threads) == 2 and all(t.startswith("mergescope-eigh") for t in threads)   # both workers
    monkeypatch.setattr(svd, "syevr_available", lambda dtype: False)   # scipy.linalg.eigh on this thread
    alone = svd._top_eigh_mrrr(g, k)
    # the same routine; one BLAS thread against two only reorders sums (last-bit differences)
    torch.testing.assert_close(pooled[0], alone[0], rtol=1e-13, atol=0)
    signs = torch.sign((pooled[1] * alone[1]).sum(-2, keepdim=True))
    torch.testing.assert_close(pooled[1] * signs, alone[1], rtol=0, atol=1e-10)
    assert torch.all(pooled[0][:, :-1] >= pooled[0][:, 1:])          # descending
