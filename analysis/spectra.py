"""Per-layer SVD of every task matrix, computed once and cached on disk; the
spectra tables (singular values, energy, effective rank, TSV-C) read from it.

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
- "auto": "gram" on data-centre CUDA GPUs with full-rate float64
          (cuSOLVER's SVD is latency-bound at these sizes; eigh of the Gram
          is several times faster per the issue's H100 figures; our own GPU
          timing: not measured, no GPU was lent) and on CPU with more than one
          thread; "svd" with one CPU thread, on MPS and consumer GPUs
          (measurements in docs/results_spectra.md).

Factors are stored float32, U (T,m,k), S (T,k), Vh (T,k,n), k = min(m,n),
S descending. Parameters of one shape are decomposed together in chunks that
fit a memory budget, so sets larger than GPU memory stream through it.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch
from safetensors import safe_open

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.taskvectors import TaskVectorSet, as_matrix, atomic_save_safetensors

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Progress = Callable[[int, int, str], None]
METHODS = ("auto", "svd", "gram")
CACHE_FORMAT = "1"
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|blocks|resblocks|h)\.\d+\.)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MERGESCOPE_CACHE", Path.home() / ".cache" / "mergescope"))


# --------------------------------------------------------------------------- kernels
@contextlib.contextmanager
def _exact_matmul():
    """TF32 would silently cut float32 products to 10-bit mantissas."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


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


def svd_gram(a: torch.Tensor) -> Factors:
    """Thin SVD of a batch (B,m,n) through float64 Gram + eigh (see module doc).

    U = X V / σ is orthonormal to ~1e-16·κ_i·κ_j, fine while every σ_i ≥
    QR_BELOW·σ_1; matrices with smaller (or zero) singular values, e.g. LoRA
    deltas, take U from a Householder QR of X V instead, which is orthonormal
    whatever the spectrum."""
    b, m, n = a.shape
    x = (a.mT if m < n else a).double()            # (B, p, k), p >= k
    with _exact_matmul():
        gram = x.mT @ x
        _, v = torch.linalg.eigh(gram)             # ascending
        v = v.flip(-1)
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
        k = s.shape[-1]
        eye = torch.eye(k, device=a.device)
        orth_u = (u.mT @ u - eye).abs().amax(dim=(-2, -1))
        orth_v = (vh @ vh.mT - eye).abs().amax(dim=(-2, -1))
    return num / den, torch.maximum(orth_u, orth_v)


def exact_svd(a: torch.Tensor, method: str = "auto", tol: float = 1e-5) -> tuple[Factors, dict]:
    """Thin SVD of a batch with the chosen method, verified; elements failing
    the check (rel. reconstruction or orthogonality error > tol) are redone
    with torch.linalg.svd. Returns the factors and a small report."""
    if method not in METHODS:
        raise ValidationError(f"SVD method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "gram" if _gram_is_faster(a.device) else "svd"
    if method == "svd":
        u, s, vh = thin_svd(a)
        return (u, s, vh), {"method": "svd", "fallbacks": 0}
    u, s, vh = svd_gram(a)
    rec, orth = factor_errors(a, u, s, vh)
    bad = ((rec > tol) | (orth > tol) | ~torch.isfinite(rec) | ~torch.isfinite(orth)).nonzero().flatten()
    if len(bad):
        ub, sb, vhb = thin_svd(a[bad])
        u[bad], s[bad], vh[bad] = ub, sb, vhb
    return (u, s, vh), {"method": "gram", "fallbacks": int(len(bad)),
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


# --------------------------------------------------------------------------- cache
class SpectralCache:
    """SVD factors (U, S, Vh) of every task's delta for each matrix parameter.

    `method`: "auto" | "gram" | "svd" (module doc). `max_batch_bytes`: working
    memory budget per batched decomposition (default: a quarter of free GPU
    memory, or 1 GiB on CPU). `progress(done, total, name)` is called after
    each parameter. Factors stay on `device` when they fit in half its free
    memory, else on the CPU (moved to `device` per `factors()` call).
    """

    def __init__(self, tvs: TaskVectorSet, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None, include_embeddings: bool = False, persist: bool = True,
                 *, method: str = "auto", tol: float = 1e-5, max_batch_bytes: int | None = None,
                 progress: Progress | None = None):
        if method not in METHODS:
            raise ValidationError(f"SVD method must be one of {METHODS}, got {method!r}")
        self.tvs = tvs
        self.device = get_device(device)
        kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
        self.names = tvs.names_of_kind(*kinds)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "spectra"
        self.persist = persist
        self.method = method
        self.tol = tol
        self.max_batch_bytes = max_batch_bytes
        self.progress = progress
        self.compute_count = 0          # parameters decomposed (per-task SVDs)
        self.sum_compute_count = 0      # parameters whose task sum was decomposed
        self.report: list[dict] = []    # one entry per batched decomposition
        self._factors: dict[str, Factors] | None = None
        self._sum: dict[str, Factors] = {}
        self._key: str | None = None
        self._lock = threading.RLock()  # one cache object is shared by the app's sessions

    # ------------------------------------------------------------ identity
    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self.tvs.fingerprint(self.names)
        return self._key

    @property
    def path(self) -> Path:
        return self.cache_dir / f"svd-{self.key}.safetensors"

    @property
    def sum_path(self) -> Path:
        return self.cache_dir / f"svdsum-{self.key}.safetensors"

    @property
    def tasks(self) -> list[str]:
        return self.tvs.tasks

    # ------------------------------------------------------------ access
    def factors(self, name: str) -> Factors:
        """(U (T,m,k), S (T,k), Vh (T,k,n)) on `device`, k = min(m, n), S descending."""
        self._require(name)
        u, s, vh = self._all()[name]
        return u.to(self.device), s.to(self.device), vh.to(self.device)

    def truncated(self, name: str, rank_fraction: float) -> tuple[Factors, int]:
        """The top ⌊f·k⌋ triplets of every task: ((U_r, S_r, Vh_r), r)."""
        u, s, vh = self.factors(name)
        r = truncation_rank(s.shape[-1], rank_fraction)
        return (u[..., :r], s[..., :r], vh[..., :r, :]), r

    def singular_values(self, name: str) -> torch.Tensor:
        """(T, k) on the CPU, without moving U and V."""
        self._require(name)
        return self._all()[name][1].cpu()

    def compute(self, progress: Progress | None = None) -> "SpectralCache":
        """Load or compute every factor now (the first `factors()` call does it too)."""
        if progress is not None:
            self.progress = progress
        self._all()
        return self

    def sum_factors(self, name: str) -> Factors:
        """SVD of the task sum Σ_t τ_t of one parameter: (U (m,k), S (k), Vh (k,n)).

        Computed on first use per parameter (and kept on disk beside the
        per-task factors); not counted in `compute_count`."""
        self._require(name)
        with self._lock:
            self._sum_factors(name)
        u, s, vh = self._sum[name]
        return u.to(self.device), s.to(self.device), vh.to(self.device)

    def _sum_factors(self, name: str) -> None:
        if name not in self._sum:
            self._load_sums()
        if name not in self._sum:
            summed = as_matrix(self.tvs.deltas(name).sum(0)).to(self.device, torch.float32)
            (u, s, vh), _ = exact_svd(summed.unsqueeze(0), self.method, self.tol)
            self._sum[name] = (u[0], s[0], vh[0])
            self.sum_compute_count += 1
            if self.persist:
                self._save(self.sum_path, self._sum)

    def _require(self, name: str) -> None:
        if name not in self.names:
            raise ValidationError(f"{name!r} has no cached spectrum: the cache covers the set's matrix and conv "
                                  f"parameters (embeddings only with include_embeddings=True); "
                                  f"{len(self.names)} names, e.g. {self.names[:2]}")

    # ------------------------------------------------------------ compute / load
    def _all(self) -> dict[str, Factors]:
        if self._factors is not None:
            return self._factors
        with self._lock:
            self._fill()
        return self._factors

    def _fill(self) -> None:
        if self._factors is None:
            loaded = self._load() if self.persist else None
            if loaded is None:
                loaded = self._compute()
                if self.persist:
                    self._save(self.path, loaded)
            self._factors = loaded

    def _budget(self) -> int:
        if self.max_batch_bytes is not None:
            return int(self.max_batch_bytes)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free // 4
        return 1 << 30

    def _storage(self) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        t = len(self.tasks)
        need = 0
        for name in self.names:
            m, n = as_matrix(torch.empty(self.tvs.shape(name), device="meta")).shape
            k = min(m, n)
            need += 4 * t * (m * k + k + k * n)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free // 2 else torch.device("cpu")

    def _compute(self) -> dict[str, Factors]:
        storage = self._storage()
        t = len(self.tasks)
        groups: dict[tuple[int, int], list[str]] = {}
        for name in self.names:
            shape = tuple(as_matrix(torch.empty(self.tvs.shape(name), device="meta")).shape)
            groups.setdefault(shape, []).append(name)
        out: dict[str, Factors] = {}
        done, total = 0, len(self.names)
        budget = self._budget()
        for (m, n), names in groups.items():
            # float64 working set of the Gram path: ~ 8 (X, Y, Q) · 3 · p·k per matrix
            per_param = t * 32 * m * n
            per_chunk = max(1, budget // per_param)
            for i in range(0, len(names), per_chunk):
                chunk = names[i:i + per_chunk]
                stack = torch.cat([as_matrix_batch(self.tvs.deltas(nm)) for nm in chunk])
                stack = stack.to(self.device, torch.float32)
                (u, s, vh), info = exact_svd(stack, self.method, self.tol)
                info.update(shape=(m, n), matrices=int(stack.shape[0]))
                self.report.append(info)
                for j, nm in enumerate(chunk):
                    sl = slice(j * t, (j + 1) * t)
                    out[nm] = (u[sl].to(storage), s[sl].to(storage), vh[sl].to(storage))
                    self.compute_count += 1
                    done += 1
                    if self.progress is not None:
                        self.progress(done, total, nm)
                del stack, u, s, vh
        return {nm: out[nm] for nm in self.names}

    def _meta(self) -> dict[str, str]:
        return {"format": CACHE_FORMAT, "tasks": ",".join(self.tasks), "key": self.key}

    def _open(self, path: Path):
        """Lazily opened safetensors file if it matches this set, else None."""
        if not path.is_file():
            return None
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception:
            return None        # unreadable cache file: recompute and overwrite
        meta = f.metadata() or {}
        if meta.get("tasks") != ",".join(self.tasks) or meta.get("format", CACHE_FORMAT) != CACHE_FORMAT:
            return None
        return f

    def _load(self) -> dict[str, Factors] | None:
        f = self._open(self.path)
        if f is None:
            return None
        keys = set(f.keys())
        if not all(f"S::{n}" in keys and f"U::{n}" in keys and f"Vh::{n}" in keys for n in self.names):
            return None
        storage = self._storage()
        out = {}
        for name in self.names:
            out[name] = tuple(f.get_tensor(f"{p}::{name}").to(storage) for p in ("U", "S", "Vh"))
            if self.progress is not None:
                self.progress(len(out), len(self.names), name)
        return out

    def _load_sums(self) -> None:
        f = self._open(self.sum_path) if self.persist else None
        if f is None:
            return
        keys = set(f.keys())
        for name in self.names:
            if name not in self._sum and f"S::{name}" in keys:
                self._sum[name] = tuple(f.get_tensor(f"{p}::{name}").to(self.device) for p in ("U", "S", "Vh"))

    def _save(self, path: Path, factors: dict[str, Factors]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        flat = {}
        for name, (u, s, vh) in factors.items():
            flat[f"U::{name}"] = u.contiguous().cpu()
            flat[f"S::{name}"] = s.contiguous().cpu()
            flat[f"Vh::{name}"] = vh.contiguous().cpu()
        atomic_save_safetensors(flat, path, self._meta())


def as_matrix_batch(stacked: torch.Tensor) -> torch.Tensor:
    """(T, *shape) deltas as (T, m, n) matrices (conv kernels flattened)."""
    return stacked.reshape(stacked.shape[0], stacked.shape[1], -1)


# --------------------------------------------------------------------------- tables
def module_of(name: str) -> str:
    """The parameter's name inside its block ('encoder.layer.3.attention.q.weight'
    -> 'attention.q.weight'), so the same module can be followed across depth."""
    m = _BLOCK.match(name)
    return name[m.end():] if m else name


def _meta_cols(cache: SpectralCache, name: str) -> dict:
    return {"param": name, "depth": cache.tvs.depth(name), "kind": cache.tvs.kind(name), "module": module_of(name)}


def _names(cache: SpectralCache, names: Iterable[str] | None) -> list[str]:
    return list(cache.names if names is None else names)


def singular_values_table(cache: SpectralCache, names: Iterable[str] | None = None) -> pd.DataFrame:
    """param, depth, kind, module, task, index (0-based), rank_fraction ((index+1)/k), sigma."""
    frames = []
    for name in _names(cache, names):
        s = cache.singular_values(name)
        t, k = s.shape
        df = pd.DataFrame({"task": [task for task in cache.tasks for _ in range(k)],
                           "index": list(range(k)) * t,
                           "rank_fraction": [(i + 1) / k for i in range(k)] * t,
                           "sigma": s.reshape(-1).double().numpy()})
        for col, val in reversed(list(_meta_cols(cache, name).items())):
            df.insert(0, col, val)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else _empty(["task", "index", "rank_fraction", "sigma"])


def _empty(cols: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=["param", "depth", "kind", "module", *cols])


def energy_table(cache: SpectralCache, rank_fractions: Sequence[float], names: Iterable[str] | None = None) -> pd.DataFrame:
    """Energy (squared Frobenius norm) kept by the top ⌊f·k⌋ singular values:
    Σ_{i<r} σ_i² / Σ_i σ_i². Columns: param, depth, kind, module, task,
    rank_fraction, rank, energy. Also TSV-C's relative error: rel_error =
    ‖A − A_r‖_F / ‖A‖_F = sqrt(1 − energy) (Eckart–Young), from the spectrum."""
    rows = []
    for name in _names(cache, names):
        s2 = cache.singular_values(name).double() ** 2
        k = s2.shape[1]
        csum = s2.cumsum(1)
        total = csum[:, -1]       # so that the full rank keeps exactly 1.0
        meta = _meta_cols(cache, name)
        for f in rank_fractions:
            r = truncation_rank(k, f)
            kept = csum[:, r - 1]
            tail = (total - kept).clamp_min(0.0)
            for ti, task in enumerate(cache.tasks):
                tot = float(total[ti])
                energy = float(kept[ti] / tot) if tot > 0 else 1.0
                err = math.sqrt(float(tail[ti]) / tot) if tot > 0 else 0.0
                rows.append({**meta, "task": task, "rank_fraction": float(f), "rank": r,
                             "energy": min(energy, 1.0), "rel_error": err})
    return pd.DataFrame(rows) if rows else _empty(["task", "rank_fraction", "rank", "energy", "rel_error"])


def tsvc_error_table(cache: SpectralCache, rank_fraction: float, names: Iterable[str] | None = None) -> pd.DataFrame:
    """TSV-C: relative Frobenius error of each task matrix truncated to rank
    fraction f, plus the share of the matrix's numbers kept r(m+n+1)/(mn)."""
    df = energy_table(cache, [rank_fraction], names)
    if df.empty:
        return df.assign(storage=[])
    shapes = {n: as_matrix(torch.empty(cache.tvs.shape(n), device="meta")).shape for n in df["param"].unique()}
    df["storage"] = [r * (shapes[p][0] + shapes[p][1] + 1) / (shapes[p][0] * shapes[p][1])
                     for p, r in zip(df["param"], df["rank"])]
    return df.drop(columns=["energy"])


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007): exp(H(p)), p_i = σ_i / Σ_j σ_j,
    H the Shannon entropy (natural log, 0·log 0 = 0). Over the last dim."""
    s = s.double().clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp_min(1e-300), torch.zeros_like(s))
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    return h.exp()


def effective_rank_table(cache: SpectralCache, names: Iterable[str] | None = None) -> pd.DataFrame:
    """param, depth, kind, module, task, k, effective_rank, effective_rank_fraction (= erank / k)."""
    rows = []
    for name in _names(cache, names):
        s = cache.singular_values(name)
        er = effective_rank(s)
        meta = _meta_cols(cache, name)
        k = s.shape[1]
        for ti, task in enumerate(cache.tasks):
            rows.append({**meta, "task": task, "k": k, "effective_rank": float(er[ti]),
                         "effective_rank_fraction": float(er[ti]) / k})
    return pd.DataFrame(rows) if rows else _empty(["task", "k", "effective_rank", "effective_rank_fraction"])


def low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> torch.Tensor:
    """U_r diag(S_r) Vh_r for one matrix or a batch."""
    with _exact_matmul():
        return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def tsvc_delta(cache: SpectralCache, task: str, rank_fraction: float) -> dict[str, torch.Tensor]:
    """TSV-C compressed task vector: each cached matrix replaced by its rank
    ⌊f·k⌋ truncation (reshaped back for conv kernels); parameters outside the
    cache (biases, norms, embeddings when excluded) are kept whole: they are
    a small part of the model and TSV compresses matrices only."""
    if task not in cache.tasks:
        raise ValidationError(f"no task named {task!r}; tasks are {cache.tasks}")
    ti = cache.tasks.index(task)
    covered = set(cache.names)
    out = {}
    for name in cache.tvs.param_names:
        if name in covered:
            (u, s, vh), r = cache.truncated(name, rank_fraction)
            out[name] = low_rank(u[ti], s[ti], vh[ti], r).reshape(cache.tvs.shape(name)).cpu()
        else:
            out[name] = cache.tvs.delta(task, name)
    return out


def tsvc_accuracy_table(cache: SpectralCache, evaluator, rank_fractions: Sequence[float], split: str = "test",
                        subsample: int | None = None, tasks: Sequence[str] | None = None,
                        include_full: bool = True, progress: Progress | None = None) -> pd.DataFrame:
    """Each task's own model with its task vector TSV-C-compressed at each rank
    fraction, scored on its own task by `evaluator.evaluate_delta` (contract in
    analysis.evaluation). `include_full` adds rank_fraction 1.0 (uncompressed
    task vector) as the reference. Columns: task, rank_fraction, metric,
    value, split, n."""
    tasks = list(tasks or [t for t in cache.tasks if t in set(evaluator.tasks)])
    missing = [t for t in tasks if t not in cache.tasks]
    if missing:
        raise ValidationError(f"no task named {missing[0]!r} in the set; tasks are {cache.tasks}")
    fractions = sorted({float(f) for f in rank_fractions} | ({1.0} if include_full else set()), reverse=True)
    frames, done, total = [], 0, len(tasks) * len(fractions)
    for task in tasks:
        for f in fractions:
            delta = tsvc_delta(cache, task, f) if f < 1.0 else cache.tvs.task_vector(task)
            df = evaluator.evaluate_delta(delta, alpha=1.0, split=split, subsample=subsample, tasks=[task])
            df = df[df["task"] == task].copy()
            df.insert(1, "rank_fraction", f)
            frames.append(df)
            done += 1
            if progress is not None:
                progress(done, total, f"{task} @ {f:g}")
    return pd.concat(frames, ignore_index=True)
