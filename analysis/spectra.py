"""Per-layer SVD of every task matrix, computed once and cached on disk.

`SpectralCache(tvs)` holds the thin SVD factors (U, S, Vh) of every task's
delta for each matrix (and conv) parameter, computed once per set with the
kernels of `analysis.svd` (batched by shape, in chunks that fit a memory
budget, so sets larger than GPU memory stream through it) and kept on disk
keyed by the set's content hash.

Persisting is off the critical path: `compute()` returns as soon as the
factors exist; the file is written by a background thread through
`analysis.atomic` (a temporary file beside the target, fsync, then an
atomic rename: a process killed mid-write leaves the old file or none, two
processes computing the same set both rename complete files, and a torn
file is refused on read and recomputed). `flush()` waits for the write and
raises `StorageError` if it failed (disk full); the factors stay in memory
either way. At interpreter exit pending writes get a few seconds to finish.

What is kept (`keep`): singular values always in full (energy, effective
rank and the spectra plots read every σ); of U and Vh, the top K directions
each parameter's rank-fraction sliders can reach:
- "full": every triplet, K = k = min(m, n).
- a fraction f_max in (0, 1]: K = ⌊f_max·k⌋ (at least 1), the rank any
  fraction f ≤ f_max truncates to (⌊f·k⌋ ≤ K), so a slider offering rank
  fractions up to f_max never reads past K.
- "auto" (default; $MERGESCOPE_SPECTRA_KEEP overrides): by matrix size.
  A matrix of rank k ≤ FULL_RANK_MAX (512: every demo set, MiniLM's 384)
  keeps everything, so Iso-CTS, subspace alignment and every slider work on
  the factors exactly as before; a larger one keeps
  K = ⌊max(AUTO_RANK_FRACTION, 1/T)·k⌋ (0.25, or 1/T for T < 4). That reaches
  TSV's default rank 1/T per task, and TSV-M's cap (⌊k/T⌋ per task) at any
  slider position.
Memory of the factors: T·K·(m + n + 1) floats per matrix instead of
T·k·(m + n + 1) (a 4096 × 4096 LLaMA projection, T = 4: K = 1024, 1/4 of it).
Reading past K is an error naming K (`top`, `truncated`, `factors`); the
callers that need whole task matrices (Iso-CTS's projected residuals, the
subspace alignment ratio) read the deltas instead when K < k (each says so).
K is part of the file's key (`key`); the task-sum factors (`sum_factors`,
one matrix per parameter, kept whole: Iso-C reads every direction) are keyed
by content alone.

This module also re-exports the SVD kernels (`analysis.svd`) and the spectra
tables (`analysis.spectra_tables`), so `from analysis.spectra import …` keeps
working for every name it offered before the split.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import math
import os
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from analysis.device import capped, get_device, out_of_memory
from analysis.errors import ResourceError, StorageError, ValidationError
from analysis.paths import cache_root
from analysis.svd import (METHODS, QR_BELOW, Factors, _exact_matmul, _gram_is_faster, as_matrix_batch,  # noqa: F401
                          exact_svd, factor_errors, low_rank, svd_gram, thin_svd, truncation_rank)
from analysis.spectra_tables import (_BLOCK, effective_rank, effective_rank_table, energy_table,  # noqa: F401
                                     module_of, singular_values_table, tsvc_accuracy_table, tsvc_delta,
                                     tsvc_error_table)
from analysis.atomic import atomic_save_safetensors, remove_stale_temps
from analysis.taskvectors import TaskVectorSet, as_matrix

Progress = Callable[[int, int, str], None]
CACHE_FORMAT = "1"
KEEP_ENV = "MERGESCOPE_SPECTRA_KEEP"
FULL_RANK_MAX = 512          # keep="auto": matrices of rank k <= this keep every triplet
AUTO_RANK_FRACTION = 0.25    # keep="auto", larger matrices: K = ⌊max(this, 1/T)·k⌋
_log = logging.getLogger(__name__)
EXIT_WAIT_S = 5.0   # at interpreter exit, pending cache writes get this long; an unfinished one is simply lost


def parse_keep(keep) -> str | float:
    """'auto' | 'full' | a fraction in (0, 1] (a number or its text); None reads
    $MERGESCOPE_SPECTRA_KEEP (default 'auto'). Anything else: ValidationError naming it."""
    where = ""
    if keep is None:
        keep, where = os.environ.get(KEEP_ENV, "auto").strip() or "auto", f"{KEEP_ENV}="
    if isinstance(keep, str) and keep in ("auto", "full"):
        return keep
    try:
        if isinstance(keep, bool):
            raise TypeError
        f = float(keep)
    except (TypeError, ValueError):
        f = math.nan
    if not 0.0 < f <= 1.0:
        raise ValidationError(f"spectral cache keep {where}{keep!r}: expected 'auto', 'full' or the largest rank "
                              "fraction to reach, a number in (0, 1]")
    return f


def kept_rank_for(k: int, n_tasks: int, keep: str | float) -> int:
    """K, the singular directions kept of a rank-k matrix under `keep` (module doc)."""
    if keep == "full" or k == 0:
        return k
    if keep == "auto":
        return k if k <= FULL_RANK_MAX else truncation_rank(k, max(AUTO_RANK_FRACTION, 1.0 / max(n_tasks, 1)))
    return truncation_rank(k, float(keep))


def default_cache_dir() -> Path:
    """The cache root (`analysis.paths.cache_root`); kept for callers of the old name."""
    return cache_root()


class SpectralCache:
    """SVD factors (U, S, Vh) of every task's delta for each matrix parameter.

    `method`: "auto" | "gram" | "svd" (module doc). `max_batch_bytes`: working
    memory budget per batched decomposition (default: a quarter of free GPU
    memory, or 1 GiB on CPU; $MERGESCOPE_DEVICE_MEMORY caps both). A parameter
    over the budget, or an out-of-memory error, makes the batches smaller or
    moves the work to the CPU, with a line in `messages` (`_compute`).
    `progress(done, total, name)` is called after
    each parameter. Factors stay on `device` when they fit in half its free
    memory, else on the CPU (moved to `device` per `factors()` call).
    `keep`: which singular directions are kept, "auto" | "full" | the
    largest rank fraction offered (module doc; None: $MERGESCOPE_SPECTRA_KEEP).
    """

    def __init__(self, tvs: TaskVectorSet, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None, include_embeddings: bool = False, persist: bool = True,
                 *, method: str = "auto", tol: float = 1e-5, max_batch_bytes: int | None = None,
                 progress: Progress | None = None, keep: str | float | None = None):
        if method not in METHODS:
            raise ValidationError(f"SVD method must be one of {METHODS}, got {method!r}")
        self.tvs = tvs
        self.device = get_device(device)
        kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
        self.names = tvs.names_of_kind(*kinds)
        self.include_embeddings = include_embeddings
        self.keep = parse_keep(keep)
        self._ranks = {n: min(as_matrix(torch.empty(tvs.shape(n), device="meta")).shape) for n in self.names}
        self._kept = {n: kept_rank_for(k, len(tvs.tasks), self.keep) for n, k in self._ranks.items()}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "spectra"
        self.persist = persist
        self.method = method
        self.tol = tol
        self.max_batch_bytes = max_batch_bytes
        self.progress = progress
        self.compute_count = 0          # parameters decomposed (per-task SVDs)
        self.sum_compute_count = 0      # parameters whose task sum was decomposed
        self.report: list[dict] = []    # one entry per batched decomposition
        self.messages: list[str] = []   # fallbacks taken for memory (smaller batches, the CPU)
        self._factors: dict[str, Factors] | None = None
        self._sum: dict[str, Factors] = {}
        self._first_looks: dict[str, torch.Tensor] = {}   # first_look's values, before the factors exist
        self._key: str | None = None
        self._lock = threading.RLock()  # one cache object is shared by the app's sessions
        self._write_lock = threading.Lock()
        self._pending: dict[Path, dict[str, Factors]] = {}   # path -> factors still to write (latest wins)
        self._writer: threading.Thread | None = None
        self._writing: Path | None = None
        self.write_errors: list[StorageError] = []           # writes that failed (the file is recomputed next time)
        self.writes = 0                                      # files written
        _LIVE.add(self)

    # ------------------------------------------------------------ identity
    @property
    def content_key(self) -> str:
        """Hash of the set's content over the cached names (`TaskVectorSet.fingerprint`)."""
        if self._key is None:
            self._key = self.tvs.fingerprint(self.names)
        return self._key

    @property
    def key(self) -> str:
        """The factor file's key: content, plus every name's K when any K < k
        (a cache keeping everything has the content key alone, as before)."""
        if self.keeps_everything:
            return self.content_key
        ks = hashlib.blake2b(",".join(str(self._kept[n]) for n in self.names).encode(), digest_size=5).hexdigest()
        return f"{self.content_key}-top{ks}"

    @property
    def path(self) -> Path:
        return self.cache_dir / f"svd-{self.key}.safetensors"

    @property
    def sum_path(self) -> Path:
        return self.cache_dir / f"svdsum-{self.content_key}.safetensors"

    @property
    def keeps_everything(self) -> bool:
        return all(self._kept[n] == self._ranks[n] for n in self.names)

    def rank(self, name: str) -> int:
        """k = min(m, n) of the parameter's matrix: how many singular values it has (all kept)."""
        self._require(name)
        return self._ranks[name]

    def kept_rank(self, name: str) -> int:
        """K: the singular directions (columns of U, rows of Vh) kept for `name`."""
        self._require(name)
        return self._kept[name]

    def keeps_all(self, name: str) -> bool:
        """Every singular direction of `name` is kept (K = k)."""
        return self.kept_rank(name) == self._ranks[name]

    def max_rank_fraction(self, name: str) -> float:
        """The largest rank fraction `truncated(name, f)` serves: K / k."""
        return self.kept_rank(name) / max(self._ranks[name], 1)

    def _beyond(self, name: str, asked: str) -> ValidationError:
        k, kk = self._ranks[name], self._kept[name]
        return ValidationError(f"{name!r}: {asked}, but this spectral cache keeps the top K={kk} of its {k} "
                               f"singular directions (keep={self.keep!r}: rank fractions up to {kk / k:.4g}); "
                               "use a smaller rank fraction, or a SpectralCache with keep='full' (or a larger "
                               f"fraction; ${KEEP_ENV})")

    @property
    def tasks(self) -> list[str]:
        return self.tvs.tasks

    # ------------------------------------------------------------ access
    def factors(self, name: str) -> Factors:
        """(U (T,m,k), S (T,k), Vh (T,k,n)) on `device`, k = min(m, n), S descending:
        every triplet, so a ValidationError naming K when this cache keeps fewer
        (`top` reads the kept ones)."""
        self._require(name)
        if not self.keeps_all(name):
            raise self._beyond(name, f"all {self._ranks[name]} singular triplets were asked for (factors())")
        u, s, vh = self._all()[name]
        return u.to(self.device), s.to(self.device), vh.to(self.device)

    def top(self, name: str, r: int) -> Factors:
        """The top r triplets of every task: (U (T,m,r), S (T,r), Vh (T,r,n)) on
        `device`; r ≤ K (`kept_rank`), else a ValidationError naming K."""
        self._require(name)
        r = int(r)
        if not 0 <= r <= self._ranks[name]:
            raise ValidationError(f"{name!r}: {r} singular triplets asked for; it has {self._ranks[name]}")
        if r > self._kept[name]:
            raise self._beyond(name, f"the top {r} singular triplets were asked for")
        u, s, vh = self._all()[name]
        return u[..., :r].to(self.device), s[..., :r].to(self.device), vh[..., :r, :].to(self.device)

    def truncated(self, name: str, rank_fraction: float) -> tuple[Factors, int]:
        """The top ⌊f·k⌋ triplets of every task: ((U_r, S_r, Vh_r), r); a
        ValidationError naming K when ⌊f·k⌋ > K."""
        self._require(name)
        r = truncation_rank(self._ranks[name], rank_fraction)
        if r > self._kept[name]:
            raise self._beyond(name, f"rank fraction {rank_fraction:g} needs the top {r} singular triplets")
        return self.top(name, r), r

    def singular_values(self, name: str) -> torch.Tensor:
        """(T, k) on the CPU, without moving U and V."""
        self._require(name)
        return self._all()[name][1].cpu()

    @property
    def ready(self) -> bool:
        """Reading a factor now decomposes nothing: the factors are in memory, or in a file for this set."""
        return self._factors is not None or (self.persist and self.path.is_file())

    def first_look(self, name: str) -> torch.Tensor:
        """(T, k) singular values of one parameter on the CPU, before the cache is computed.

        From the factors when they exist; else one batched `svdvals` of that
        parameter's T matrices alone, kept in memory but never written, so a
        page can draw the layer it shows first and decompose the rest after
        (the first figure in the time of one layer, not of the whole set).
        LAPACK's values, not the Gram route's: they agree with
        `singular_values` to float32 precision (a figure's, not a merge's)."""
        self._require(name)
        if self._factors is not None:
            return self.singular_values(name)
        if name not in self._first_looks:
            stack = as_matrix_batch(self.tvs.deltas(name)).to(self.device, torch.float32)
            self._first_looks[name] = torch.linalg.svdvals(stack).cpu()
        return self._first_looks[name]

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
            summed = as_matrix(self.tvs.deltas(name).sum(0)).float()
            try:
                (u, s, vh), _ = exact_svd(summed.to(self.device).unsqueeze(0), self.method, self.tol)
            except Exception as exc:
                if not out_of_memory(exc) or self.device.type == "cpu":
                    raise
                self._note(f"out of memory on {self.device} decomposing the task sum of {name!r}; using the CPU")
                (u, s, vh), _ = exact_svd(summed.unsqueeze(0), self.method, self.tol)
            self._sum[name] = (u[0], s[0], vh[0])
            self.sum_compute_count += 1
            if self.persist:
                self._persist(self.sum_path, self._sum)

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
            if self.persist:
                self._await_other_writers(self.path)
            loaded = self._load() if self.persist else None
            if loaded is None:
                t0 = time.perf_counter()
                loaded = self._compute()
                _log.info("spectra: decomposed %d parameters of %d tasks for set %s in %.2f s", len(self.names),
                          len(self.tasks), self.key, time.perf_counter() - t0)
                if self.persist:
                    self._persist(self.path, loaded)
            self._factors = loaded

    def _budget(self) -> int:
        """Working bytes one batched decomposition may take: `max_batch_bytes`,
        else a quarter of the device's free memory (1 GiB on a CPU), either
        capped by $MERGESCOPE_DEVICE_MEMORY."""
        if self.max_batch_bytes is not None:
            return int(self.max_batch_bytes)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return capped(free) // 4
        return capped(4 << 30) // 4

    def _storage(self) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        t = len(self.tasks)
        need = 0
        for name in self.names:
            m, n = as_matrix(torch.empty(self.tvs.shape(name), device="meta")).shape
            k, kk = self._ranks[name], self._kept[name]
            need += 4 * t * (m * kk + k + kk * n)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < capped(free) // 2 else torch.device("cpu")

    def _note(self, message: str) -> None:
        """A fallback taken (smaller batches, the CPU): kept in `messages` and logged."""
        self.messages.append(message)
        _log.warning("spectra: %s", message)

    def _compute(self) -> dict[str, Factors]:
        """Decompose shape group by shape group, as many matrices per batch as the
        budget allows. A group whose single parameter exceeds the budget runs on
        the CPU; an out-of-memory error halves the batch, and at one parameter
        moves to the CPU; only a CPU that cannot hold one parameter raises
        ResourceError. Each fallback leaves a message in `messages`.
        With $MERGESCOPE_DISTRIBUTED=ray the parameters are Ray tasks instead (`_compute_on_ray`)."""
        from analysis import distributed
        if distributed.backend() == "ray":
            return self._compute_on_ray(distributed.Runner("ray", device=self.device))
        storage = self._storage()
        t = len(self.tasks)
        groups: dict[tuple[int, int], list[str]] = {}
        for name in self.names:
            shape = tuple(as_matrix(torch.empty(self.tvs.shape(name), device="meta")).shape)
            groups.setdefault(shape, []).append(name)
        out: dict[str, Factors] = {}
        done, total = 0, len(self.names)
        budget = self._budget()
        cpu = torch.device("cpu")
        for (m, n), names in groups.items():
            # float64 working set of the Gram path: ~ 8 (X, Y, Q) · 3 · p·k per matrix
            per_param = t * 32 * m * n
            device = self.device
            if per_param > budget:
                where = "one parameter per batch"
                if device.type != "cpu":
                    device, where = cpu, "on the CPU"
                self._note(f"{len(names)} parameter(s) of shape {m}x{n}: one needs ~{_mib(per_param)} of working "
                           f"memory, over the {_mib(budget)} budget on {self.device}; decomposing {where}")
            per_chunk = max(1, budget // per_param)
            i = 0
            while i < len(names):
                chunk = names[i:i + per_chunk]
                try:
                    stack = torch.cat([as_matrix_batch(self.tvs.deltas(nm)) for nm in chunk])
                    stack = stack.to(device, torch.float32)
                    # only the directions kept are formed (the shape group shares one K)
                    keep = max(self._kept[nm] for nm in chunk)
                    (u, s, vh), info = exact_svd(stack, self.method, self.tol, keep=keep)
                except Exception as exc:
                    if not out_of_memory(exc):
                        raise
                    stack = u = s = vh = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if len(chunk) > 1:
                        per_chunk = max(1, len(chunk) // 2)
                        self._note(f"out of memory on {device} decomposing {len(chunk)} parameters of shape {m}x{n} "
                                   f"at once; retrying {per_chunk} per batch")
                    elif device.type != "cpu":
                        self._note(f"out of memory on {device} for one parameter of shape {m}x{n}; decomposing "
                                   f"this group on the CPU")
                        device = cpu
                    else:
                        raise ResourceError(f"the CPU ran out of memory decomposing one parameter ({chunk[0]!r}, "
                                            f"{t} tasks of shape {m}x{n}, ~{_mib(per_param)} working memory): "
                                            f"free memory or use fewer tasks") from exc
                    continue
                info.update(shape=(m, n), matrices=int(stack.shape[0]), device=str(device))
                self.report.append(info)
                for j, nm in enumerate(chunk):
                    sl, kk, k = slice(j * t, (j + 1) * t), self._kept[nm], self._ranks[nm]
                    # a copy when K < k, so the full batch is freed with this chunk
                    out[nm] = (_kept(u[sl, :, :kk], storage, kk < k), s[sl].to(storage),
                               _kept(vh[sl, :kk, :], storage, kk < k))
                    self.compute_count += 1
                    done += 1
                    if self.progress is not None:
                        self.progress(done, total, nm)
                i += len(chunk)
                del stack, u, s, vh
        return {nm: out[nm] for nm in self.names}

    def _compute_on_ray(self, runner) -> dict[str, Factors]:
        """The same decompositions as Ray tasks, one per parameter (analysis.distributed.compute_spectra:
        same SVD method and tolerance, factors bit for bit those of `_compute`). Workers reopen the set from
        its files and write each parameter's factors under this cache's folder (shared storage on a
        cluster), keeping the largest fraction any parameter here keeps; they are read back, cut to what
        this cache keeps, and the working folder is removed. `progress` names the cluster."""
        from analysis import distributed
        fraction = min(1.0, max(self._kept[n] / self._ranks[n] for n in self.names))
        cluster = distributed.cluster_summary(runner.address)
        report = (None if self.progress is None else
                  lambda done, total, name: self.progress(done, total, f"{name} · {cluster}"))
        work = self.cache_dir / f".ray-{self.key}-{os.getpid()}"
        try:
            store = distributed.compute_spectra(self.tvs, work, runner=runner, max_rank_fraction=fraction,
                                                include_embeddings=self.include_embeddings, method=self.method,
                                                tol=self.tol, progress=report)
            storage, out = self._storage(), {}
            for name in self.names:
                u, s, vh = store.factors(name)
                kk, k = self._kept[name], self._ranks[name]
                out[name] = (_kept(u[..., :kk], storage, kk < k), s.to(storage),   # the layout `_compute` gives
                             _kept(vh[..., :kk, :], storage, kk < k))
                self.compute_count += 1
                # one entry per job, as `_compute` has one per batch; plus where it ran
                self.report.append({**store.report[name], "matrices": len(self.tasks), "ray": cluster})
            return out
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _meta(self) -> dict[str, str]:
        return {"format": CACHE_FORMAT, "tasks": ",".join(self.tasks), "key": self.key, "keep": str(self.keep)}

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
        for n in self.names:   # K columns of U, k singular values: anything else was written under another keep
            if (f.get_slice(f"U::{n}").get_shape()[-1] != self._kept[n]
                    or f.get_slice(f"S::{n}").get_shape()[-1] != self._ranks[n]):
                return None
        storage = self._storage()
        out = {}
        for name in self.names:
            out[name] = tuple(f.get_tensor(f"{p}::{name}").to(storage) for p in ("U", "S", "Vh"))
            if self.progress is not None:
                self.progress(len(out), len(self.names), name)
        return out

    def _load_sums(self) -> None:
        if self.persist:
            self._await_other_writers(self.sum_path)
        f = self._open(self.sum_path) if self.persist else None
        if f is None:
            return
        keys = set(f.keys())
        for name in self.names:
            if name not in self._sum and f"S::{name}" in keys:
                self._sum[name] = tuple(f.get_tensor(f"{p}::{name}").to(self.device) for p in ("U", "S", "Vh"))

    # ------------------------------------------------------------ persisting (background)
    def _persist(self, path: Path, factors: dict[str, Factors]) -> None:
        """Queue `factors` for writing to `path` and return at once. One writer
        thread per cache; a newer snapshot of the same path replaces an unwritten one."""
        with self._write_lock:
            self._pending[path] = dict(factors)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="spectra-persist", daemon=True)
                self._writer.start()

    def _write_pending(self) -> None:
        while True:
            with self._write_lock:
                if not self._pending:
                    self._writer = None
                    return
                path = next(iter(self._pending))
                factors = self._pending.pop(path)
                self._writing = path
            try:
                self._save(path, factors)
                self.writes += 1
            except Exception as exc:   # a cache that cannot be written is recomputed next time, never fatal
                if not isinstance(exc, StorageError):
                    exc = StorageError(errno.EIO, f"could not write {path}: {type(exc).__name__}: {exc}", str(path))
                self.write_errors.append(exc)
                _log.warning("spectral cache not saved (it stays in memory): %s", exc)
            finally:
                self._writing = None

    def _writes(self, path: Path) -> bool:
        with self._write_lock:
            return path in self._pending or self._writing == path

    def _await_other_writers(self, path: Path) -> None:
        """Another cache object of this process is writing `path`: reading the
        finished file beats decomposing everything again."""
        for other in list(_LIVE):
            if other is not self and other._writes(path):
                try:
                    other.flush()
                except OSError:
                    pass

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued cache file is on disk (or `timeout` seconds
        pass); True when nothing is left to write. Raises the first write error
        (`StorageError` naming the file; no partial file is left)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._write_lock:
                writer = self._writer
            if writer is None:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            writer.join(left)
        if self.write_errors:
            raise self.write_errors[0]
        return True

    @property
    def writing(self) -> bool:
        """A cache file is being (or waits to be) written."""
        return self._writer is not None

    def _save(self, path: Path, factors: dict[str, Factors]) -> None:
        remove_stale_temps(path)   # left by a process that died mid-write
        flat = {}
        for name, (u, s, vh) in factors.items():
            flat[f"U::{name}"] = u.contiguous().cpu()
            flat[f"S::{name}"] = s.contiguous().cpu()
            flat[f"Vh::{name}"] = vh.contiguous().cpu()
        atomic_save_safetensors(flat, path, self._meta())


def _kept(x: torch.Tensor, storage: torch.device, cut: bool) -> torch.Tensor:
    """`x` on `storage`; with `cut` (a slice of the decomposed batch) a compact
    copy of its own, so the batch's discarded directions are freed."""
    return x.to(storage, memory_format=torch.contiguous_format, copy=True) if cut else x.to(storage)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


_LIVE: "weakref.WeakSet[SpectralCache]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for cache in list(_LIVE):
        try:
            cache.flush(max(0.0, deadline - time.monotonic()))
        except OSError:
            pass
