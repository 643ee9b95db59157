"""LAPACK's ?syevr (MRRR) for the top k eigenpairs, callable without the GIL.

`scipy.linalg.eigh(subset_by_index=…)` holds the GIL for the whole LAPACK call, so two threads run its
calls one after the other: 34–36 ms per 768 × 768 float64 matrix (top 30) from two threads against 33–34 ms
from one (2-core CPU). This module calls the same routine through `scipy.linalg.cython_lapack`, scipy's
public C interface to its own LAPACK (each routine a C function pointer in `__pyx_capi__`), via ctypes,
which releases the GIL for a foreign call. Two threads with scipy's BLAS at one thread each then took
19–20.5 ms per matrix against 26–30 ms from one thread with two BLAS threads, with results identical to
the last bit (`/tmp` check, 16 matrices; tests/test_lapack.py compares with scipy.linalg.eigh).

No Streamlit, no torch: numpy arrays in and out. `syevr_top` returns None where scipy offers no such
pointer (then the caller uses scipy.linalg.eigh)."""
from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy as np

_ROUTINES: dict = {}
_ROUTINES_LOCK = threading.Lock()


def _routine(dtype: np.dtype):
    """The ctypes function for ?syevr of `dtype` (float32: ssyevr, float64: dsyevr), or None."""
    name = {np.dtype(np.float64): "dsyevr", np.dtype(np.float32): "ssyevr"}.get(np.dtype(dtype))
    if name is None:
        return None
    with _ROUTINES_LOCK:
        if name not in _ROUTINES:
            _ROUTINES[name] = _bind(name, ctypes.c_double if name == "dsyevr" else ctypes.c_float)
        return _ROUTINES[name]


def _bind(name: str, real):
    try:
        from scipy.linalg import cython_lapack
        capsule = cython_lapack.__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):
        return None
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    i, r, c = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(real), ctypes.c_char_p
    # jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info (scipy's
    # cython_lapack signature: every argument by reference, no hidden string lengths)
    proto = ctypes.CFUNCTYPE(None, c, c, c, i, r, i, r, r, i, i, r, i, r, r, i, i, r, i, i, i, i)
    return proto(address), real


def syevr_available(dtype) -> bool:
    """Whether `syevr_top` can solve matrices of this numpy dtype."""
    return _routine(dtype) is not None


def syevr_top(a: np.ndarray, k: int):
    """(values ascending (k,), vectors (n, k)) of the k largest eigenpairs of symmetric a (n, n), float32 or
    float64, by ?syevr with abstol 0 (as scipy.linalg.eigh(driver="evr") calls it); a is not modified.
    None where the routine is not available. Raises ValueError on non-finite input and numpy's LinAlgError
    (a ValueError) when LAPACK reports a failure, as scipy.linalg.eigh does."""
    bound = _routine(a.dtype)
    if bound is None:
        return None
    fn, real = bound
    n = a.shape[0]
    if a.shape != (n, n) or not 1 <= k <= n:
        raise ValueError(f"syevr_top: need a square matrix and 1 <= k <= n, got shape {a.shape} and k={k}")
    if not np.isfinite(a).all():
        raise ValueError("syevr_top: the matrix holds infs or NaNs")
    work_a = np.array(a, order="F", copy=True)             # ?syevr overwrites its input
    w = np.empty(n, dtype=a.dtype)
    z = np.empty((k, n), dtype=a.dtype)                     # Fortran's n × k, column-major
    isuppz = np.empty(2 * k, dtype=np.intc)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    zero = real(0.0)

    def ref(v):
        return ctypes.byref(ctypes.c_int(v))

    def call(work, lwork, iwork, liwork):
        fn(b"V", b"I", b"L", ref(n), work_a.ctypes.data_as(ctypes.POINTER(real)), ref(n), ctypes.byref(zero),
           ctypes.byref(zero), ref(n - k + 1), ref(n), ctypes.byref(zero), ctypes.byref(found),
           w.ctypes.data_as(ctypes.POINTER(real)), z.ctypes.data_as(ctypes.POINTER(real)), ref(n),
           isuppz.ctypes.data_as(ctypes.POINTER(ctypes.c_int)), work, lwork, iwork, liwork, ctypes.byref(info))

    lwork, liwork = real(0.0), ctypes.c_int(0)
    call(ctypes.byref(lwork), ref(-1), ctypes.byref(liwork), ref(-1))   # workspace query
    work = np.empty(max(1, int(lwork.value)), dtype=a.dtype)
    iwork = np.empty(max(1, liwork.value), dtype=np.intc)
    call(work.ctypes.data_as(ctypes.POINTER(real)), ref(work.size), iwork.ctypes.data_as(ctypes.POINTER(ctypes.c_int)),
         ref(iwork.size))
    if info.value != 0 or found.value != k:
        raise np.linalg.LinAlgError(f"?syevr failed (info={info.value}, found {found.value} of {k} eigenpairs)")
    return w[:k].copy(), z.T


_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def one_blas_thread():
    """Yields True with scipy's (and numpy's) BLAS at one thread, restored on leaving, where no other
    thread is inside; else yields False at once and changes nothing (the caller then solves on its own
    thread). OpenBLAS has one process-wide thread count: concurrent ?syevr calls from two threads with two
    BLAS threads each took 35–39 ms per matrix against 19–20 ms with one (2-core CPU). One holder at a
    time, because a count restored from a thread other than the one that set it did not take (OpenBLAS
    0.3.30 under threadpoolctl 3.8: it stayed at 1)."""
    if not _LIMIT_LOCK.acquire(blocking=False):
        yield False
        return
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, user_api="blas"):
            yield True
    finally:
        _LIMIT_LOCK.release()
