"""SVD kernels: thin SVDs of batches of matrices, exact to float32 and verified.

Decomposition ("method"):
- "svd":  torch.linalg.svd on each shape group (float32 LAPACK / cuSOLVER).
- "gram": exact thin SVD through the smaller Gram matrix in float64:
          G = XᵀX (k×k), G = V Λ Vᵀ (eigh), Y = X V, σ_i = ‖Y_i‖, U = Y / σ.
          Squaring the condition number is harmless in float64 for float32
          inputs: U's loss of orthogonality is ~1e-16·κ_i·κ_j, below float32
          resolution while κ ≤ 1e4; matrices with smaller (or zero) singular
          values take U from a Householder QR of Y (orthonormal whatever the
          spectrum, S = |diag R|). Every batch is verified (relative
          reconstruction error and orthogonality of U and V, in float32);
          anything over `tol` is recomputed with torch.linalg.svd, so the
          result is exact either way. The matmuls are float64 (no TF32).
          With `keep` = K < k (the spectral cache's large matrices) only the
          top K columns of Y, U, V are formed and checked (S stays whole):
          ViT-12-shaped set, T = 8, K = 192 of 768, 2-core CPU, all factors
          84.7 / 82.4 s → 47.3 / 43.6 s, interleaved (benchmarks/spectra.py
          --keep auto).
- "auto": "gram" on data-centre CUDA GPUs with full-rate float64
          (cuSOLVER's SVD is latency-bound at these sizes; eigh of the Gram
          is several times faster per the issue's H100 figures; our own GPU
          timing: not measured, no GPU was lent) and on CPU with more than one
          thread; "svd" with one CPU thread, on MPS and consumer GPUs
          (measurements in docs/results_spectra.md).

Factors are float32, U (…,m,k), S (…,k), Vh (…,k,n), k = min(m,n), S descending.
`analysis.spectra.SpectralCache` computes them once per set and caches them;
`analysis.spectra_tables` turns them into tables.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from analysis.errors import ValidationError
from analysis.lapack import one_blas_thread, syevr_available, syevr_top

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
METHODS = ("auto", "svd", "gram")


@contextlib.contextmanager
def tf32_matmuls(allowed: bool):
    """CUDA float32 matmuls with TF32 tensor cores on or off while inside."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_EIGH_POOL = None   # worker threads of `batched_eigh`, one intra-op thread each (made on first use)
_EIGH_POOL_LOCK = threading.Lock()


def _one_thread_worker(ready: threading.Barrier) -> None:
    torch.set_num_threads(1)   # this thread's OpenMP / MKL count, and torch's process-wide default
    torch.get_num_threads()    # settle this thread's lazy init at 1 now
    ready.wait(timeout=30)


def _lowered() -> bool:
    """Whether the calling thread runs at a higher niceness than the main thread (whose thread id is the pid):
    a background job (ui/jobs.lower_priority). False where the OS does not say (Linux keeps one per thread)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) > os.getpriority(os.PRIO_PROCESS, os.getpid())
    except (AttributeError, OSError):
        return False


def _eigh_pool(workers: int):
    """`workers` threads that each run torch with one intra-op thread, or None where none exist yet and the
    caller runs lowered. A new thread inherits its creator's niceness, and an unprivileged thread cannot
    lower its own again, so the pool is only ever started by a thread at the process's own niceness (a page's
    run): started by the server's first background merge (ui/speculate: nice 10), it would run every later
    page merge's eighs at nice 10 beside the browser (in-process, beside a process using half a core: 2.21 /
    2.31 s a quick-demo Iso-CTS move against 2.02 / 2.02 s). One pool per niceness was tried instead: then a
    page that waits on a speculated merge in flight (ui/speculate: `take`) waits on eighs at nice 10 too.
    torch.set_num_threads also sets the default every *new* thread starts with, so the caller's count is put
    back once every worker has started (a thread born in that instant would start with 1: slower, never
    wrong)."""
    global _EIGH_POOL
    with _EIGH_POOL_LOCK:
        if _EIGH_POOL is None or _EIGH_POOL._max_workers != workers:
            if _lowered():
                return None
            threads = torch.get_num_threads()
            ready = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="mergescope-eigh")
            started = [pool.submit(_one_thread_worker, ready) for _ in range(workers)]
            try:
                ready.wait(timeout=30)
            finally:
                torch.set_num_threads(threads)
            for f in started:
                f.result()
            _EIGH_POOL = pool
        return _EIGH_POOL


def batched_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a batch (..., n, n). On a CPU with several intra-op threads, the batch
    is split over as many worker threads, each solving its share with one thread.

    Why: LAPACK's eigh of one matrix parallelises poorly (much of it is BLAS-2), and its threads
    spin-wait between parallel regions, so beside other work on the CPU (a page's background
    scoring) it slows down badly. On the 2-core CPU, 24 float64 368 × 368 matrices: 0.21–0.24 s
    split over two 1-thread workers against 0.26–0.30 s batched with 2 threads and 0.32–0.37 s
    with 1, idle. Quick-demo re-merge per knob move (benchmarks/remerge_moves.py, medians), before
    → after: idle no gain (TSV-M rank 0.98 → 1.00 s, Iso-CTS common fraction 1.83 → 1.74 s);
    beside forward passes on another thread TSV-M 2.06 → 1.59 s, Iso-CTS 3.35 → 3.00 s
    (docs/results_live.md).
    Elsewhere (CUDA, one thread, one matrix) it is torch.linalg.eigh as is."""
    workers = min(torch.get_num_threads(), 8)
    lead = a.shape[:-2]
    flat = a.reshape(-1, *a.shape[-2:])
    if a.device.type != "cpu" or workers < 2 or flat.shape[0] < 2:
        return torch.linalg.eigh(a)
    pool = _eigh_pool(workers)
    if pool is None:   # a background job before any page started the workers: its own threads
        return torch.linalg.eigh(a)
    chunks = [c for c in torch.tensor_split(flat, min(workers, flat.shape[0])) if c.shape[0]]
    parts = list(pool.map(torch.linalg.eigh, chunks))
    vals = torch.cat([p[0] for p in parts]).reshape(*lead, a.shape[-1])
    vecs = torch.cat([p[1] for p in parts]).reshape(*lead, *a.shape[-2:])
    return vals, vecs


def _exact_matmul():
    """TF32 would silently cut float32 products to 10-bit mantissas."""
    return tf32_matmuls(False)


def thin_svd(a: torch.Tensor) -> Factors:
    """Thin SVD (U, S, Vh) in float32 of a matrix or a batch, that always returns.

    LAPACK's divide-and-conquer SVD can raise "failed to converge" when most
    singular values (nearly) coincide, which is what concatenated, almost
    orthonormal factors look like (it happened on Iso-CTS's V* at 12 ViT
    blocks). Then float64 is tried, and then the float64 Gram route."""
    try:
        return torch.linalg.svd(a.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()
    except torch.linalg.LinAlgError:
        pass
    batch = a.reshape(-1, *a.shape[-2:])
    u, s, vh = svd_gram(batch)
    return u.reshape(*a.shape[:-2], *u.shape[-2:]), s.reshape(*a.shape[:-2], -1), vh.reshape(*a.shape[:-2], *vh.shape[-2:])


QR_BELOW = 1e-4   # columns with σ_i < QR_BELOW·σ_1 get their U from a QR (see svd_gram)


def _kept_count(k: int, keep: int | None) -> int:
    """How many of k singular vectors `keep` asks for: all when None, else between 1 and k."""
    return k if keep is None else max(1, min(int(keep), k))


def svd_gram(a: torch.Tensor, keep: int | None = None) -> Factors:
    """Thin SVD of a batch (B,m,n) through float64 Gram + eigh (see module doc).

    U = X V / σ is orthonormal to ~1e-16·κ_i·κ_j, fine while every σ_i ≥
    QR_BELOW·σ_1; matrices with smaller (or zero) singular values, e.g. LoRA
    deltas, take U from a Householder QR of X V instead, which is orthonormal
    whatever the spectrum.

    keep: only the leading K = keep singular vectors are formed (U (B,m,K),
    Vh (B,K,n)); S is still all k values, the tail σ_i = √λ_i (i > K) from
    the float64 eigenvalues (absolute error ~1e-16·σ_1²/σ_i, below float32
    resolution while σ_i ≥ 1e-4·σ_1, and never above ~1e-8·σ_1), capped at
    σ_K so S stays descending. Y = X V then costs p·k·K instead of p·k², and
    the QR guard looks at the kept columns only (σ_K against σ_1)."""
    b, m, n = a.shape
    k = min(m, n)
    kk = _kept_count(k, keep)
    x = (a.mT if m < n else a).double()            # (B, p, k), p >= k
    with _exact_matmul():
        gram = x.mT @ x
        lam, v = batched_eigh(gram)                # ascending
        lam, v = lam.flip(-1), v.flip(-1)[..., :kk]
        y = x @ v                                  # = U S (columns nearly orthogonal)
    s = torch.linalg.vector_norm(y, dim=-2)
    u = y / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-2)
    need_qr = (s.amin(-1) < QR_BELOW * s.amax(-1)).nonzero().flatten()
    if len(need_qr):
        q, r = torch.linalg.qr(y[need_qr])
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        u[need_qr] = q * torch.where(d < 0, -1.0, 1.0).to(d.dtype).unsqueeze(-2)
        s[need_qr] = d.abs()
    # near-degenerate values can swap by rounding: keep S descending
    s, order = s.sort(dim=-1, descending=True)
    u = torch.gather(u, -1, order.unsqueeze(-2).expand_as(u))
    v = torch.gather(v, -1, order.unsqueeze(-2).expand_as(v))
    if kk < k:
        tail = lam[..., kk:].clamp_min(0).sqrt()
        s = torch.cat([s, torch.minimum(tail, s[..., -1:])], dim=-1)
    u, s, v = u.float(), s.float(), v.float()
    if m < n:                                      # Aᵀ = U S Vᵀ  =>  A = V S Uᵀ
        return v, s, u.mT
    return u, s, v.mT


def factor_errors(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch element: relative Frobenius reconstruction error and
    max |UᵀU − I|, |VVᵀ − I| (orthogonality), both float32."""
    with _exact_matmul():
        rec = (u * s.unsqueeze(-2)) @ vh
        num = torch.linalg.matrix_norm(a.float() - rec)
        den = torch.linalg.matrix_norm(a.float()).clamp_min(torch.finfo(torch.float32).tiny)
    return num / den, _orthonormality_error(u, vh)


def _orthonormality_error(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Per batch element, max |UᵀU − I|, |Vh Vhᵀ − I| (float32, no TF32)."""
    with _exact_matmul():
        eye = torch.eye(u.shape[-1], device=u.device)
        orth_u = (u.mT @ u - eye).abs().amax(dim=(-2, -1))
        orth_v = (vh @ vh.mT - eye).abs().amax(dim=(-2, -1))
    return torch.maximum(orth_u, orth_v)


def kept_factor_errors(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`factor_errors` for the leading K triplets of a k-value SVD (U (…,m,K), S (…,k), Vh (…,K,n)):
    a reconstruction is not defined, so the first error is the larger of
    - the kept triplets' residual on the short side, ‖AᵀU_K − V_K S_K‖_F (m ≥ n) or ‖A V_K − U_K S_K‖_F
      (m < n), over ‖A‖_F: the side `svd_gram` did not construct (there U = A V/σ holds by construction),
      so it tests that the eigenvectors are right;
    - |‖A‖_F² − Σσ_i²| / ‖A‖_F² over all k values (the tail comes from the eigenvalues);
    the second is max |U_KᵀU_K − I|, |V_KᵀV_K − I|. Cost ~m·n·K instead of ~2·m·n·k + (m + n)·k²."""
    m, n = a.shape[-2:]
    kk = u.shape[-1]
    af = a.float()
    with _exact_matmul():
        if m >= n:
            res = af.mT @ u - vh.mT * s[..., None, :kk]
        else:
            res = af @ vh.mT - u * s[..., None, :kk]
        norm2 = af.double().square().sum(dim=(-2, -1))
        den = norm2.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        rec = torch.linalg.matrix_norm(res).double() / den
        energy = (norm2 - s.double().square().sum(-1)).abs() / norm2.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.maximum(rec, energy).float(), _orthonormality_error(u, vh)


def exact_svd(a: torch.Tensor, method: str = "auto", tol: float = 1e-5, keep: int | None = None
              ) -> tuple[Factors, dict]:
    """Thin SVD of a batch with the chosen method, verified; elements failing
    the check (rel. reconstruction or orthogonality error > tol) are redone
    with torch.linalg.svd. Returns the factors and a small report.

    keep: return only the leading K singular vectors (S in full): on the Gram route
    they are all that is formed and checked (`svd_gram`, `kept_factor_errors`);
    on the SVD route the full factors are cut."""
    if method not in METHODS:
        raise ValidationError(f"SVD method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "gram" if _gram_is_faster(a.device) else "svd"
    k = min(a.shape[-2:])
    kk = _kept_count(k, keep)
    if method == "svd":
        u, s, vh = thin_svd(a)
        return (u[..., :kk], s, vh[..., :kk, :]), {"method": "svd", "fallbacks": 0}
    u, s, vh = svd_gram(a, kk)
    rec, orth = factor_errors(a, u, s, vh) if kk == k else kept_factor_errors(a, u, s, vh)
    bad = ((rec > tol) | (orth > tol) | ~torch.isfinite(rec) | ~torch.isfinite(orth)).nonzero().flatten()
    if len(bad):
        ub, sb, vhb = thin_svd(a[bad])
        u[bad], s[bad], vh[bad] = ub[..., :kk], sb, vhb[..., :kk, :]
    return (u, s, vh), {"method": "gram", "fallbacks": int(len(bad)), "kept": kk,
                        "max_rec_error": float(rec.max()), "max_orth_error": float(orth.max())}


def _gram_is_faster(device: torch.device) -> bool:
    """CUDA: data-centre GPUs (P100, V100, A100, H100/H200, B200) run float64 at
    half the float32 rate; consumer GPUs at 1/32-1/64, where the Gram path's
    float64 matmuls would cost more than cuSOLVER's SVD saves (GPU timings not
    measured: no GPU was lent). CPU: measured on 2 cores
    (docs/results_spectra.md): under load the Gram path beat LAPACK's SVD with
    2 threads (1.0-1.5x wall) and lost with 1 thread (0.7-0.9x); on the idle
    machine, 12 ViT blocks, it took 96 s against 91 s, i.e. a tie within the
    noise, and it is ~6x more accurate (3.5e-7 vs 2.1e-6), so it stays."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) in {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
    return device.type == "cpu" and torch.get_num_threads() > 1


def truncation_rank(k: int, rank_fraction: float) -> int:
    """Rank kept at a rank fraction: ⌊f·k⌋, at least 1, at most k."""
    if not (0.0 < rank_fraction <= 1.0):
        raise ValidationError(f"rank fraction must be in (0, 1], got {rank_fraction!r}")
    return max(1, min(k, int(math.floor(rank_fraction * k + 1e-9))))


def as_matrix_batch(stacked: torch.Tensor) -> torch.Tensor:
    """(T, *shape) deltas as (T, m, n) matrices (conv kernels flattened)."""
    return stacked.reshape(stacked.shape[0], stacked.shape[1], -1)


def low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> torch.Tensor:
    """U_r diag(S_r) Vh_r for one matrix or a batch."""
    with _exact_matmul():
        return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def _orthonormalise(x: torch.Tensor, passes: int) -> torch.Tensor:
    """Orthonormal basis of each matrix's columns (…, n, w) by shifted Cholesky QR, with no
    host synchronisation: the first pass factors XᵀX + s·I with s = 11(nw + w(w+1))·u·‖X‖_F²
    (Fukaya et al. 2020: the Cholesky then succeeds whatever the conditioning, and leaves
    κ ≲ u^(-1/2)), the later passes are plain Cholesky QR (two of them restore orthogonality
    to working precision: shifted CholeskyQR3). Cholesky and triangular solves are batched on
    CUDA, Householder QR (geqrf) is not."""
    n, w = x.shape[-2], x.shape[-1]
    eye = torch.eye(w, device=x.device, dtype=x.dtype)
    for i in range(passes):
        gram = x.mT @ x
        if i == 0:
            shift = 11 * (n * w + w * (w + 1)) * torch.finfo(x.dtype).eps
            gram = gram + (shift * gram.diagonal(dim1=-2, dim2=-1).sum(-1))[..., None, None] * eye
        chol, _ = torch.linalg.cholesky_ex(gram)
        x = torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)   # X R⁻¹, R = Lᵀ
    return x


SMALL_EIGH_ON_DEVICE_UP_TO = 32   # CUDA: cuSOLVER batches eigh (syevjBatched) only up to 32 × 32


def _small_eigh(a: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a batch of small symmetric matrices (the Rayleigh–Ritz problems), descending.
    where: "device" | "host" | "auto" (on CUDA, matrices wider than 32 go to the CPU:
    cuSOLVER runs them one by one, each a few launches and host round trips)."""
    if where == "auto":
        where = "host" if a.device.type == "cuda" and a.shape[-1] > SMALL_EIGH_ON_DEVICE_UP_TO else "device"
    if where == "host" and a.device.type != "cpu":
        vals, vecs = torch.linalg.eigh(a.cpu())
        vals, vecs = vals.to(a.device, non_blocking=True), vecs.to(a.device, non_blocking=True)
    else:
        vals, vecs = batched_eigh(a)
    return vals.flip(-1), vecs.flip(-1)


def top_eigh_exact(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenpairs of symmetric g (..., n, n), descending, by LAPACK: on a CPU, for
    n ≥ 256 and k ≤ n/12, only those k by MRRR (`_top_eigh_mrrr`); else a full `batched_eigh`."""
    if _mrrr_pays(g, k):
        try:
            return _top_eigh_mrrr(g, k)
        except ValueError:   # non-finite input or no convergence (LinAlgError): torch's eigh decides
            pass
    vals, vecs = batched_eigh(g)
    return vals.flip(-1)[..., :k], vecs.flip(-1)[..., :k]


def _mrrr_pays(g: torch.Tensor, k: int) -> bool:
    """Where `_top_eigh_mrrr` beats a full `batched_eigh` on the 2-core CPU (float64, ms per matrix, 16 per
    batch, benchmarks/mrrr_threads.py, 2026-12-07). Over the worker threads (two or more intra-op threads
    and matrices): n = 768: full 64–89; k = 23: 17.9, k = 192: 45.0, k = 384: 72.6. n = 384: full 10.3–10.7;
    k = 38: 5.4, k = 64: 7.4, k = 96: 10.0. n = 256: full 4.7–5.0; k = 43: 4.2, k = 64: 4.7. n = 128: full
    1.3; k = 11: 1.1, k = 21: 1.5. So k ≤ n/5 from n = 256, k ≤ n/12 at n = 128. One at a time (one thread,
    or one matrix: scipy.linalg.eigh's figures of before) the crossover is near k = n/11 (n = 768: full
    52.2; k = 23: 25.9, k = 77: 43.1, k = 192: 77.7), so k ≤ n/12 from n = 256."""
    n = g.shape[-1]
    if not (g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) and n >= 128 and k > 0
            and not g.requires_grad):
        return False
    pooled = torch.get_num_threads() >= 2 and g.numel() > n * n
    if pooled and n >= 256:
        return 5 * k <= n
    return 12 * k <= n and (pooled or n >= 256)


def _top_eigh_mrrr(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenpairs of each symmetric g (..., n, n) (CPU), descending, by LAPACK's
    ?syevr (MRRR): the same tridiagonal reduction as a full eigh, then only the k wanted eigenvectors
    and their back-transformation, which is where a full eigh spends most of its time at n = 768.
    Through `analysis.lapack.syevr_top`, which releases the GIL, so a batch is split over
    `batched_eigh`'s worker threads with scipy's BLAS at one thread each: on the 2-core CPU 19–20.5
    against 26–30 ms per 768 × 768 float64 matrix (top 30) one at a time (scipy.linalg.eigh holds the
    GIL: two threads gained nothing; benchmarks/mrrr_threads.py). Where the pool is not
    running (a background job before any page started it), or another merge holds the one-thread BLAS
    setting, one call per matrix on the calling thread (through the binding; scipy.linalg.eigh where the
    binding is unavailable). Eigenvalues ascending from LAPACK, flipped
    here. Raises ValueError on non-finite input, numpy's LinAlgError (a ValueError) when LAPACK does not
    converge."""
    n = g.shape[-1]
    lead = g.shape[:-2]
    flat = g.detach().reshape(-1, n, n).contiguous().numpy()
    vals = torch.empty(flat.shape[0], k, dtype=g.dtype)
    vecs = torch.empty(flat.shape[0], n, k, dtype=g.dtype)

    def solve(indices) -> None:
        for i in indices:   # C order is fine: LAPACK reads aᵀ, which is a
            w, v = _syevr_one(flat[i], k)
            vals[i] = torch.from_numpy(w[::-1].copy())
            vecs[i] = torch.from_numpy(v[:, ::-1].copy())

    workers = min(torch.get_num_threads(), 8)   # batched_eigh's pool: the same count, so the same pool
    pool = _eigh_pool(workers) if workers >= 2 and flat.shape[0] >= 2 and syevr_available(flat.dtype) else None
    if pool is None:
        solve(range(flat.shape[0]))
    else:
        with one_blas_thread() as alone:
            if not alone:   # another merge's MRRR holds the workers' BLAS setting: solve here
                solve(range(flat.shape[0]))
            else:
                parts = np.array_split(np.arange(flat.shape[0]), min(workers, flat.shape[0]))
                for f in [pool.submit(solve, part) for part in parts]:
                    f.result()
    return vals.reshape(*lead, k), vecs.reshape(*lead, n, k)


def _syevr_one(a: np.ndarray, k: int):
    """(values ascending, vectors (n, k)) of a's top k by ?syevr: the GIL-free binding, else scipy's."""
    found = syevr_top(a, k)
    if found is not None:
        return found
    import scipy.linalg
    n = a.shape[0]
    return scipy.linalg.eigh(a, subset_by_index=(n - k, n - 1), driver="evr", overwrite_a=False)


def top_k_eigh(g: torch.Tensor, k: int, *, oversample: int | None = None, squarings: int | None = None,
               max_iters: int = 30, check_every: int = 3, tol: float = 1e-6, small_eigh: str = "auto",
               return_info: bool = False):
    """The k largest eigenpairs (values descending (..., k), vectors as columns (..., n, k)) of
    symmetric positive semi-definite matrices g (..., n, n), by block subspace iteration:
    batched matmuls and Cholesky factors plus small w × w eigenproblems instead of a full
    eigendecomposition.

    Why: cuSOLVER's eigh is latency-bound on batches of small matrices (384 float64 768 × 768
    took 3.04 s on an H100 whether batched or not, with or without vectors, float32 or
    float64: benchmarks/topk_solvers.py), while Iso-CTS needs only the top k ≈ r/(2T) of each
    projected residual after every change of its common fraction.

    Method. H = (G/‖G‖_F)^(2^s) by s squarings (the same eigenvectors; the ratio λ_{w+1}/λ_k
    that sets the convergence rate is raised to the power 2^s: 0.88 → 0.36 for s = 3);
    a seeded Gaussian start block of width w = k + p (p = max(16, k) unless `oversample` is
    given; w ≤ n); then Q ← orth(H Q) (two Cholesky QR passes, the first shifted, no host
    synchronisation: `_orthonormalise`). Every `check_every` steps a Rayleigh–Ritz step on G
    itself: the eigenpairs (θ, Y) of QᵀGQ give Ritz pairs Z = Q Y, and a matrix is done when

        ‖G Z_k − Z_k Θ_k‖_F ≤ tol · (θ_k − θ_{k+1})

    (Davis–Kahan: the sine of the largest angle between span Z_k and the true top-k
    eigenspace is then at most about tol; θ_k − θ_{k+1} estimates the gap). Matrices whose
    k-th eigenvalue is numerically zero (θ_k ≤ n·u·θ_1: any basis of the rest is as valid
    as eigh's) need only ‖G Z_k − Z_k Θ_k‖_F ≤ tol·θ_1; zero matrices are done at once.
    The only host synchronisation is one bool per check. Matrices not done within `max_iters`
    steps (a k-th eigenvalue repeated, so the top-k subspace is not defined; or too small a
    gap) are solved by torch.linalg.eigh: the answer never depends on luck, only the time.

    Precision: g's dtype throughout (Iso-CTS passes float64 Gram matrices). H's top-k
    subspace is only determined to ~u·(λ_1/λ_k)^(2^s)/(relative gap) (float64, s = 3, a
    spectrum falling 14× by the k-th value: ~3e-7, over the test), so the second half of the
    `max_iters` budget iterates with G itself (rate λ_{w+1}/λ_k per step, fast exactly where
    λ_k ≪ λ_1); a top-k that still does not converge takes the fallback. s defaults to 3 in
    float64 and 1 in float32. Measured on the ViT-block Grams of Iso-CTS (768 × 768 and
    the square branch's (m − common)², T = 8, c = 0.5 / 0.8 / 0.95) on CPU: largest sine
    between the subspaces ≤ 1e-6 (typically 1e-9), eigenvalues to 1e-14 relative; the
    merged Iso-CTS deltas within 1e-6 relative of the exact route (benchmarks/merge.py).

    small_eigh: where the w × w Rayleigh–Ritz problems run, "device" | "host" | "auto"
    (`_small_eigh`). Where w > n/2, or n ≤ 64 (n ≤ 128 on a CPU), the full eigh is used directly
    (the iteration saves nothing there: on the 2-core CPU, 192 float64 80 × 80 Grams, top 10,
    took 0.046 s by `batched_eigh` against 0.069 s by the iteration; 96 × 96, top 12: 0.036 vs
    0.040 s). Returns (values, vectors) and, with return_info, a dict: steps,
    checks, fallback (matrices solved exactly), route ("subspace" | "exact").
    """
    n = g.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"top_k_eigh: need 0 < k <= n, got k={k}, n={n}")
    p = max(16, k) if oversample is None else oversample
    w = min(n, k + p)
    if squarings is None:
        squarings = 3 if g.dtype == torch.float64 else 1

    if 2 * w > n or n <= (128 if g.device.type == "cpu" else 64):
        vals, vecs = top_eigh_exact(g, k)
        info = {"steps": 0, "checks": 0, "fallback": 0, "route": "exact"}
        return (vals, vecs, info) if return_info else (vals, vecs)
    lead = g.shape[:-2]
    mats = g.reshape(-1, n, n)
    b = mats.shape[0]
    tiny = torch.finfo(g.dtype).tiny
    gen = torch.Generator(device=g.device).manual_seed(0)
    q = torch.randn(b, n, w, generator=gen, device=g.device, dtype=g.dtype)
    vals = torch.zeros(b, k, device=g.device, dtype=g.dtype)
    vecs = torch.eye(n, k, device=g.device, dtype=g.dtype).expand(b, n, k).clone()   # zero matrices keep these
    norm = torch.linalg.matrix_norm(mats)
    done = norm <= tiny
    steps = checks = 0
    eye_w = torch.eye(w, device=g.device, dtype=g.dtype)
    with _exact_matmul():
        # zero matrices (done already) iterate on the identity: no 0/0 in the Cholesky factors
        h = torch.where(done[:, None, None], torch.eye(n, device=g.device, dtype=g.dtype),
                        mats / norm.clamp_min(tiny)[:, None, None])
        for _ in range(squarings):
            h = h @ h
        for steps in range(1, max_iters + 1):
            check = steps % check_every == 0 or steps == max_iters
            # H's top-k subspace is only as exact as u·λ_1^(2^s)/(λ_k^(2^s) gap): past half the budget,
            # steps with G itself polish below that floor (fast where λ_k ≪ λ_1, the case it hurts)
            q = _orthonormalise((h if 2 * steps <= max_iters else mats) @ q, 3 if check else 2)
            if not check:
                continue
            checks += 1
            gq = mats @ q
            small = 0.5 * (q.mT @ gq + gq.mT @ q)
            # a non-finite block (a broken-down factor) must not make the batched eigh raise:
            # the identity in its place fails the test below, so that matrix takes the fallback
            finite = torch.isfinite(small).all(-1).all(-1) & torch.isfinite(q).all(-1).all(-1)
            theta, y = _small_eigh(torch.where(finite[:, None, None], small, eye_w), small_eigh)   # descending
            yk, tk = y[..., :k], theta[:, :k]
            z = q @ yk
            resid = torch.linalg.matrix_norm(gq @ yk - z * tk[:, None, :])
            gap = theta[:, k - 1] - theta[:, k]
            null = theta[:, k - 1] <= n * torch.finfo(g.dtype).eps * theta[:, 0]
            ok = finite & ((resid <= tol * gap) | (null & (resid <= tol * theta[:, 0])))
            fresh = ok & ~done
            vals = torch.where(fresh[:, None], tk, vals)
            vecs = torch.where(fresh[:, None, None], z, vecs)
            done = done | ok
            if bool(done.all()):
                break
    fallback = ~done
    n_fallback = int(fallback.sum())
    if n_fallback:
        vals[fallback], vecs[fallback] = top_eigh_exact(mats[fallback], k)
    vals, vecs = vals.reshape(*lead, k), vecs.reshape(*lead, n, k)
    if return_info:
        return vals, vecs, {"steps": steps, "checks": checks, "fallback": n_fallback, "route": "subspace"}
    return vals, vecs
