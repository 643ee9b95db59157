"""Per-tensor work as Ray tasks keyed by tensor name: spectra, STI, merges.

    from analysis.distributed import Runner, compute_spectra, sti_tables, merge
    runner = Runner("ray")                                     # or Runner() : $MERGESCOPE_DISTRIBUTED, off by default
    store = compute_spectra(tvs, "/shared/factors", runner=runner, progress=lambda d, t, name: ...)
    sti, pairs = sti_tables(store, rank_fraction=0.25, runner=runner)
    result = merge(store, "tsv_m", runner=runner, rank_fraction=0.25)   # a MergeResult, or sink=...

Every job reads what it needs by name and returns something small:
- a *factor job* reads one parameter's T deltas lazily from the set's own
  files (the worker reopens the set from a `SetRecipe`: paths, never tensors
  through the object store), decomposes them exactly as `SpectralCache` does
  (`analysis.svd.exact_svd`, same method, same tolerance), writes
  U, S, Vh to `<directory>/<name>.safetensors` (shared storage: a folder
  every node sees, on a cluster) and returns the singular values, which the
  driver keeps in full;
- an *STI job* reads one parameter's factors and returns its STI and the
  pair matrix (`analysis.interference.layer_sti`, the same function);
- a *merge job* reads one parameter's factors and deltas and returns its
  merged delta (the method's own `merge_group`, or its `rest` rule); a
  method's whole-model `prepare` pass, if it has one, runs once in the driver.
Results are identical to the single-process path (tests/test_distributed.py):
factors, STI and merges bit for bit in process; on Ray the same but STI, to
1e-9 (below). A U or Vh the Gram kernel returns as a transposed view is
written transposed and read back as that view: BLAS rounds a product of a
transposed view and of a contiguous copy differently (~1e-7 relative), and
the store reproduces the layout a fresh `SpectralCache` holds.

Where it runs (`Runner`):
- "off" (the default; `$MERGESCOPE_DISTRIBUTED` unset, "" or "off"): the
  same jobs, one after the other in this process;
- "ray": Ray tasks. `ray.init` is called once if Ray is not initialised:
  with `address` (or `$RAY_ADDRESS`) it joins that cluster, without one it
  starts Ray on this machine. Each task asks for `cpus_per_task` CPUs, and
  one GPU when the device is CUDA (Ray then gives every task its own GPU
  through CUDA_VISIBLE_DEVICES). At most `max_in_flight` tasks are queued at
  once (default: twice the cluster's CPUs), so results never pile up in the
  object store faster than the driver consumes them.
`progress(done, total, name)` is called as each job finishes (the
project's progress convention; `done` counts finished jobs of `total`).

Memory: the driver holds the singular values and one result at a time (a
merge's tensors go to `sink` as they arrive when one is given) and runs a
method's `prepare` pass in the memory its `peak_memory` declares; a worker
holds one parameter's deltas and factors. `max_rank_fraction` < 1 keeps
only the top ⌊f·k⌋ directions of U and V on disk (S always in full); STI and
merges at larger rank fractions are refused, naming the value.

Differences from the single-process path, all deliberate:
- the SVD method "auto" is resolved in the driver for CPU work: Ray runs a
  1-CPU task with one torch thread, which would otherwise switch the CPU
  kernel from the Gram route to LAPACK's SVD (`analysis.svd._gram_is_faster`)
  and change the factors in the last bits; on CUDA each worker resolves it
  for its own GPU, as `SpectralCache` would there;
- each parameter is decomposed (and merged) on its own, where `SpectralCache`
  and the shape-grouped methods batch same-shaped parameters; the batched
  kernels compute every matrix of a batch independently, so the results are
  the same (the test compares them exactly);
- STI's float64 sums are split across threads by torch, so a 1-thread Ray
  task and a 2-thread process may differ in the last bits (4.9e-11 relative
  measured by benchmarks/llm_scale.py); factors and merges stayed bitwise
  equal in every comparison we ran;
- the data-aware methods are refused: their evaluator lives in one process.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.atomic import atomic_write
from analysis.device import get_device, out_of_memory
from analysis.errors import HyperparameterError, MergescopeError, ValidationError
from analysis.svd import _gram_is_faster, as_matrix_batch, exact_svd, truncation_rank
from analysis.taskvectors import TaskVectorSet, as_matrix

ENV_VAR = "MERGESCOPE_DISTRIBUTED"
BACKENDS = ("off", "ray")
STORE_FORMAT = "1"
Progress = Callable[[int, int, str], None]


class DistributedError(MergescopeError):
    """Distribution was asked for and cannot be had (Ray missing, a set workers cannot reopen)."""


def backend(setting: str | None = None) -> str:
    """"off" or "ray": `setting` when given, else $MERGESCOPE_DISTRIBUTED (unset or "" = "off")."""
    value = setting if setting is not None else os.environ.get(ENV_VAR, "")
    value = (value or "off").strip().lower()
    if value not in BACKENDS:
        source = "distributed" if setting is not None else f"${ENV_VAR}"
        raise ValidationError(f"{source} = {value!r} is not one of {list(BACKENDS)}")
    return value


def require_ray():
    """The `ray` module, or DistributedError saying how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise DistributedError(f"distribution on Ray was asked for ({ENV_VAR}=ray or distributed='ray') but the "
                               "'ray' package is not installed: pip install 'mergescope[ray]' (or pip install "
                               f"ray), or set {ENV_VAR}=off to run in this process") from exc
    return ray


def connect(address: str | None = None, **init_kwargs):
    """Ray, initialised once: an existing session is reused; else `address`
    (or $RAY_ADDRESS) joins a cluster, and no address starts Ray locally.

    A local start puts the folder holding this `analysis` package first on
    the workers' PYTHONPATH, so they run the driver's code (not another copy
    installed in the environment). A cluster's nodes need the package
    installed, or `runtime_env={"py_modules": [...]}` in `init_kwargs`."""
    ray = require_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
            env_vars = dict(runtime_env.get("env_vars") or {})
            here = str(Path(__file__).resolve().parents[1])
            env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (here, env_vars.get("PYTHONPATH",
                                                                  os.environ.get("PYTHONPATH", ""))) if p)
            runtime_env["env_vars"] = env_vars
            init_kwargs["runtime_env"] = runtime_env
        ray.init(address=address, **init_kwargs)
    return ray


# --------------------------------------------------------------------------- reopening a set in a worker
@dataclass(frozen=True)
class SetRecipe:
    """How a worker reopens a task-vector set lazily, through the project's own loaders.

    loader: "checkpoints" (`TaskVectorSet.from_checkpoints`: files, Hugging
    Face folders, LoRA adapters), "hf" (`analysis.ownset.open_hf_set`) or
    "saved" (`TaskVectorSet.load`). Paths must be readable on every node."""

    loader: str
    base: str
    tasks: tuple[tuple[str, str], ...] = ()
    exclude: tuple[str, ...] = ()

    def open(self) -> TaskVectorSet:
        if self.loader == "saved":
            tvs = TaskVectorSet.load(self.base)
            tasks = [t for t, _ in self.tasks]
            return tvs if not tasks or tasks == tvs.tasks else tvs.subset(tasks)
        if self.loader == "checkpoints":
            return TaskVectorSet.from_checkpoints(self.base, dict(self.tasks), exclude=list(self.exclude))
        if self.loader == "hf":
            from analysis.ownset import open_hf_set
            return open_hf_set(self.base, dict(self.tasks), exclude=list(self.exclude)).tvs
        raise ValidationError(f"set recipe loader {self.loader!r} is not one of ['checkpoints', 'hf', 'saved']")


def recipe_of(tvs: TaskVectorSet) -> SetRecipe:
    """The recipe that reopens `tvs` from its files (DistributedError for a set held in memory)."""
    from analysis.ownset import RenamedSource
    from analysis.taskvectors import read_safetensors_metadata
    exclude = tuple(p.pattern for p in tvs.exclude)
    origin = str(tvs.base.origin)
    if origin.endswith(".safetensors") and Path(origin).is_file() and \
            "mergescope" in read_safetensors_metadata(Path(origin)):
        return SetRecipe("saved", origin, tuple((t, origin) for t in tvs.tasks))   # a subset keeps its tasks
    sources = tvs.sources
    if any(str(sources.get(k, "<")).startswith("<") for k in ["base", *tvs.tasks]):
        raise DistributedError("this task-vector set lives in memory (built from state dicts): workers read "
                               "tensors from files; save it with tvs.save(path), reopen it with "
                               "TaskVectorSet.load(path) and distribute that")
    base = str(sources["base"])
    if isinstance(tvs.base, RenamedSource):
        def folder(p: str) -> str:   # open_hf_set takes folders; a source's origin may be its weights file
            return p if Path(p).is_dir() else str(Path(p).parent)
        return SetRecipe("hf", folder(base), tuple((t, folder(sources[t])) for t in tvs.tasks), exclude)
    return SetRecipe("checkpoints", base, tuple((t, str(sources[t])) for t in tvs.tasks), exclude)


_SETS: dict[SetRecipe, TaskVectorSet] = {}
_SETS_LOCK = threading.Lock()


def _open_set(recipe: SetRecipe) -> TaskVectorSet:
    """A worker opens each set once (headers only) and keeps it for its later jobs."""
    with _SETS_LOCK:
        if recipe not in _SETS:
            _SETS[recipe] = recipe.open()
        return _SETS[recipe]


# --------------------------------------------------------------------------- the factor store
def factor_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{quote(name, safe='.-_')}.safetensors"


class FactorStore:
    """Per-task SVD factors of the set's matrix parameters, one file per name.

    The read API of `SpectralCache` (`names`, `tasks`, `tvs`, `device`,
    `factors`, `truncated`, `singular_values`), so the spectra tables of
    `analysis.spectra_tables` and `analysis.interference` read it as they read
    the cache. U (T,m,kept), S (T,k) in full, Vh (T,kept,n), kept = ⌊f·k⌋ at
    f = `max_rank_fraction` (k when 1)."""

    def __init__(self, directory: str | Path, tasks: Sequence[str], names: Sequence[str], *,
                 max_rank_fraction: float = 1.0, tvs: TaskVectorSet | None = None, recipe: SetRecipe | None = None,
                 device: str | torch.device = "cpu", singular_values: dict[str, torch.Tensor] | None = None,
                 svd_method: str = "auto", tol: float = 1e-5):
        self.directory = Path(directory)
        self.tasks = list(tasks)
        self.names = list(names)
        self.max_rank_fraction = float(max_rank_fraction)
        self.tvs = tvs
        self.recipe = recipe
        self.device = torch.device(device)
        self._s = dict(singular_values or {})
        self.svd_method, self.tol = svd_method, tol   # how the factors were (and task sums are) decomposed
        self.report: dict[str, dict] = {}            # name -> the kernel's report (method, fallbacks, errors)

    def _require(self, name: str) -> None:
        if name not in self.names:
            raise ValidationError(f"{name!r} is not in the factor store {self.directory} "
                                  f"({len(self.names)} names, e.g. {self.names[:2]})")

    def _read(self, name: str, keys: Iterable[str]) -> list[torch.Tensor]:
        self._require(name)
        path = factor_path(self.directory, name)
        if not path.is_file():
            raise ValidationError(f"{path}: no factors of {name!r}; compute them with compute_spectra")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("tasks", "[]")) != self.tasks:
                raise ValidationError(f"{path}: factors of tasks {meta.get('tasks')}, this store has {self.tasks}")
            # a fresh, aligned copy: BLAS kernels may sum in another order on unaligned memory
            have = set(f.keys())
            return [f.get_tensor(k).clone() if k in have else f.get_tensor(k + "^T").clone().mT for k in keys]

    def singular_values(self, name: str) -> torch.Tensor:
        """(T, k) on the CPU: every singular value, whatever was kept of U and V."""
        if name not in self._s:
            self._s[name] = self._read(name, ["S"])[0]
        return self._s[name]

    def kept_rank(self, name: str) -> int:
        """K: the directions kept of `name` (⌊max_rank_fraction · k⌋), as SpectralCache.kept_rank."""
        return truncation_rank(self.singular_values(name).shape[-1], self.max_rank_fraction)

    # the per-name reads SpectralCache offers (merge methods call them through ctx.cache)
    def rank(self, name: str) -> int:
        """k = min(m, n): every singular value is kept."""
        return self.singular_values(name).shape[-1]

    def keeps_all(self, name: str) -> bool:
        return self.kept_rank(name) == self.rank(name)

    def top(self, name: str, r: int):
        """The top r triplets of every task (r ≤ the kept directions, else a ValidationError naming them)."""
        r, kept = int(r), self.kept_rank(name)
        if not 0 <= r <= kept:
            raise ValidationError(f"{name!r}: the top {r} singular triplets were asked for; the factor store "
                                  f"{self.directory} keeps {kept} of {self.rank(name)} "
                                  f"(max_rank_fraction = {self.max_rank_fraction})")
        u, s, vh = self.factors(name)
        return u[..., :r], s[..., :r], vh[..., :r, :]

    def factors(self, name: str):
        """(U (T,m,kept), S (T,k), Vh (T,kept,n)) on `device`."""
        u, s, vh = self._read(name, ["U", "S", "Vh"])
        return u.to(self.device), s.to(self.device), vh.to(self.device)

    def check_fraction(self, rank_fraction: float) -> None:
        if rank_fraction > self.max_rank_fraction + 1e-12:
            raise HyperparameterError(f"rank_fraction = {rank_fraction!r} needs more directions than this factor "
                                      f"store keeps (max_rank_fraction = {self.max_rank_fraction}); compute the "
                                      "spectra again with a larger max_rank_fraction")

    def truncated(self, name: str, rank_fraction: float):
        """The top ⌊f·k⌋ triplets of every task: ((U_r, S_r, Vh_r), r), like `SpectralCache.truncated`."""
        self.check_fraction(rank_fraction)
        u, s, vh = self.factors(name)
        r = truncation_rank(s.shape[-1], rank_fraction)
        return (u[..., :r], s[..., :r], vh[..., :r, :]), r


# --------------------------------------------------------------------------- where jobs run
class Runner:
    """Runs jobs in this process ("off") or as Ray tasks ("ray"); see the module doc."""

    def __init__(self, distributed: str | None = None, *, address: str | None = None,
                 device: str | torch.device | None = None, cpus_per_task: float = 1,
                 max_in_flight: int | None = None, init_kwargs: dict | None = None):
        self.backend = backend(distributed)
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.max_in_flight = max_in_flight
        self.init_kwargs = dict(init_kwargs or {})
        if self.backend == "ray":
            require_ray()
            # the driver may have no GPU where the cluster's workers do: "cuda" is taken as asked
            self.device = str(device) if device is not None else get_device().type
        else:
            self.device = str(get_device(device))
        self._remote: dict[Callable, object] = {}

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def resources(self) -> dict:
        """What each Ray task asks for: `cpus_per_task` CPUs, and one GPU when the device is CUDA."""
        return {"num_cpus": self.cpus_per_task, "num_gpus": 1 if self.device_type == "cuda" else 0}

    def warm_up(self) -> int:
        """Ray: start one worker per CPU of the cluster (each imports torch and
        this module) before timed work; returns how many distinct workers answered.
        In process: nothing to start, 1."""
        if self.backend == "off":
            return 1
        ray = connect(self.address, **self.init_kwargs)
        n = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_task))
        return len({pid for _, pid in self.map(_worker_pid, [(str(i), (0.5,)) for i in range(n)])})

    def svd_method(self, method: str) -> str:
        """The SVD method jobs use: "auto" resolved here for CPU work (module doc)."""
        if method == "auto" and self.device_type == "cpu":
            return "gram" if _gram_is_faster(torch.device("cpu")) else "svd"
        return method

    def map(self, fn: Callable, jobs: Sequence[tuple[str, tuple]], progress: Progress | None = None
            ) -> Iterator[tuple[str, object]]:
        """Run fn(*args) for every (key, args); yield (key, result) as each finishes."""
        total = len(jobs)
        if self.backend == "off":
            for done, (key, args) in enumerate(jobs, 1):
                result = fn(*args)
                if progress is not None:
                    progress(done, total, key)
                yield key, result
            return
        yield from self._map_ray(fn, jobs, progress)

    def _map_ray(self, fn, jobs, progress):
        ray = connect(self.address, **self.init_kwargs)
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue = list(jobs)
        pending: dict = {}
        done, total = 0, len(queue)
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    key, args = queue.pop(0)
                    ref = self._remote[fn].options(**self.resources(),
                                                   name=f"{fn.__name__.strip('_')}:{key}").remote(*args)
                    pending[ref] = key
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    key = pending.pop(ref)
                    result = ray.get(ref)
                    done += 1
                    if progress is not None:
                        progress(done, total, key)
                    yield key, result
        finally:
            for ref in pending:   # an error or an abandoned generator: stop what is still queued
                ray.cancel(ref)


def cluster_summary(address: str | None = None) -> str:
    """Where Ray tasks run, for progress lines: 'Ray at <address | this machine>: N node(s), C CPUs, G GPUs'
    (connects as `connect` does)."""
    ray = connect(address)
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    where = address or os.environ.get("RAY_ADDRESS") or "this machine"
    return (f"Ray at {where}: {nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs")


# --------------------------------------------------------------------------- jobs (run in workers)
def _worker_pid(hold_s: float) -> int:
    """A worker's process id, after holding it `hold_s` seconds (so each of a batch lands on its own worker)."""
    import time
    time.sleep(hold_s)
    return os.getpid()


def _stacked(tvs: TaskVectorSet, name: str) -> torch.Tensor:
    """(T, *shape) float32 deltas, the values of `tvs.deltas(name)`, read one task
    at a time into one tensor: the list `deltas` stacks would double the peak."""
    out = torch.empty((len(tvs.tasks), *tvs.shape(name)), dtype=torch.float32)
    for i, task in enumerate(tvs.tasks):
        out[i] = tvs.delta(task, name)
    return out


def _stored(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """`t` as written: a transposed view (the Gram kernel's U or Vh) is kept as its
    contiguous transpose under `key^T` and read back as the same view, so matmuls
    downstream see the layout SpectralCache holds and round the same way."""
    if t.shape[-2] > 1 and t.stride(-2) == 1 and not t.is_contiguous():
        return {key + "^T": t.mT.contiguous().cpu()}
    return {key: t.contiguous().cpu()}


def _factor_job(recipe: SetRecipe, name: str, directory: str, tasks: list[str], max_rank_fraction: float,
                method: str, tol: float, device: str):
    """Decompose one parameter's T deltas as SpectralCache does; write the factors; return S (CPU) and a report."""
    tvs = _open_set(recipe)
    dev = torch.device(device)
    stack = as_matrix_batch(_stacked(tvs, name))
    note = ""
    kept = truncation_rank(min(stack.shape[-2:]), max_rank_fraction)
    try:
        (u, s, vh), info = exact_svd(stack.to(dev, torch.float32), method, tol, keep=kept)
    except Exception as exc:
        if not out_of_memory(exc) or dev.type == "cpu":
            raise
        note = f"out of memory on {dev} for {name!r}; decomposed on the CPU"
        dev = torch.device("cpu")
        (u, s, vh), info = exact_svd(stack.float(), method if method != "auto" else "gram", tol, keep=kept)
    tensors = {"S": s.contiguous().cpu()}
    for key, t in (("U", u[..., :kept]), ("Vh", vh[..., :kept, :])):
        tensors.update(_stored(key, t))
    meta = {"format": STORE_FORMAT, "name": name, "tasks": json.dumps(tasks), "kept": str(kept)}
    atomic_write(factor_path(directory, name), lambda tmp: save_file(tensors, str(tmp), meta))
    info.update(shape=tuple(stack.shape[1:]), device=str(dev), note=note)
    return tensors["S"], info


def _sti_job(directory: str, tasks: list[str], name: str, rank_fraction: float, max_rank_fraction: float,
             device: str):
    from analysis.interference import layer_sti
    store = FactorStore(directory, tasks, [name], max_rank_fraction=max_rank_fraction, device=device)
    return layer_sti(store, name, rank_fraction, pairs=True)


class _JobFactors:
    """What a method's `merge_group` reads through `ctx.cache`, for one parameter:
    its factors with U and V widened back to k columns (zeros past the kept
    ones: the driver checked that the rank fraction stays within them), and
    the task sum's SVD computed the way `SpectralCache.sum_factors` does."""

    def __init__(self, store: FactorStore, tvs: TaskVectorSet, method: str, tol: float):
        self.store, self.tvs, self.method, self.tol = store, tvs, method, tol
        self.names, self.device, self.tasks = store.names, store.device, store.tasks

    def factors(self, name: str):
        u, s, vh = self.store.factors(name)
        k = s.shape[-1]
        if u.shape[-1] < k:
            u = torch.cat([u, u.new_zeros(*u.shape[:-1], k - u.shape[-1])], dim=-1)
            vh = torch.cat([vh, vh.new_zeros(*vh.shape[:-2], k - vh.shape[-2], vh.shape[-1])], dim=-2)
        return u, s, vh

    def rank(self, name: str) -> int:
        return self.store.rank(name)

    def kept_rank(self, name: str) -> int:
        return self.store.kept_rank(name)

    def keeps_all(self, name: str) -> bool:
        return self.store.keeps_all(name)

    def top(self, name: str, r: int):
        return self.store.top(name, r)

    def sum_factors(self, name: str):
        summed = as_matrix(self.tvs.deltas(name).sum(0)).float().to(self.device)
        (u, s, vh), _ = exact_svd(summed.unsqueeze(0), self.method, self.tol)
        return u[0], s[0], vh[0]


def _merge_job(recipe: SetRecipe, directory: str | None, tasks: list[str], max_rank_fraction: float,
               method: str, params: dict, name: str, covered: bool, device: str, polar: str, svd_method: str,
               tol: float, state=None, topk: str = "auto"):
    """One parameter's merged delta: the method's `merge_group` on it alone (with the
    driver's `prepare` result as `ctx.state`), or its `rest` rule."""
    from analysis.merging import METHODS, MergeContext, MergeInputs, ParamGroup
    spec = METHODS[method]
    tvs = _open_set(recipe)
    cache = None
    if directory is not None:
        store = FactorStore(directory, tasks, [name] if covered else [], max_rank_fraction=max_rank_fraction,
                            device=device)
        cache = _JobFactors(store, tvs, svd_method, tol)
    inputs = MergeInputs(tvs, device=device, persist=False)
    if not covered:
        return spec.rest(_stacked(tvs, name).to(inputs.device), params).cpu()
    ctx = MergeContext(device=inputs.device, inputs=inputs, cache=cache, polar=polar, topk=topk, memo=inputs.memo,
                       state=state)
    return spec.merge_group(ParamGroup([name], inputs), params, ctx)[name].cpu()


# --------------------------------------------------------------------------- the driver's side
def compute_spectra(tvs: TaskVectorSet, directory: str | Path, *, runner: Runner | None = None,
                    max_rank_fraction: float = 1.0, include_embeddings: bool = False, method: str = "auto",
                    tol: float = 1e-5, recipe: SetRecipe | None = None, progress: Progress | None = None
                    ) -> FactorStore:
    """Per-task SVD factors of every matrix (and conv) parameter of `tvs`, one
    job per parameter, written under `directory`; the singular values stay in
    the returned store's memory. `recipe`: how workers reopen the set
    (default: `recipe_of(tvs)`)."""
    runner = runner or Runner()
    truncation_rank(1, max_rank_fraction)   # (0, 1], with the project's message
    recipe = recipe or recipe_of(tvs)
    kinds = ("matrix", "conv", "embedding") if include_embeddings else ("matrix", "conv")
    names = tvs.names_of_kind(*kinds)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    svd_method = runner.svd_method(method)
    jobs = [(n, (recipe, n, str(directory), tvs.tasks, max_rank_fraction, svd_method, tol, runner.device))
            for n in names]
    store = FactorStore(directory, tvs.tasks, names, max_rank_fraction=max_rank_fraction, tvs=tvs, recipe=recipe,
                        svd_method=svd_method, tol=tol)
    for name, (s, info) in runner.map(_factor_job, jobs, progress):
        store._s[name] = s
        store.report[name] = info
    return store


STI_COLUMNS = ["param", "depth", "kind", "module", "rank", "sti"]
PAIR_COLUMNS = ["param", "depth", "kind", "module", "rank", "task", "task_b", "sti"]


def sti_tables(store: FactorStore, rank_fraction: float, *, runner: Runner | None = None,
               names: Iterable[str] | None = None, progress: Progress | None = None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`analysis.interference.sti_tables` with one job per parameter: the same two tables."""
    import itertools
    runner = runner or Runner()
    truncation_rank(1, rank_fraction)
    store.check_fraction(rank_fraction)
    names = list(store.names if names is None else names)
    jobs = [(n, (str(store.directory), store.tasks, n, rank_fraction, store.max_rank_fraction, runner.device))
            for n in names]
    got = dict(runner.map(_sti_job, jobs, progress))
    rows, pair_rows = [], []
    for name in names:
        sti, r, pair = got[name]
        meta = store.tvs.layer_meta(name)
        rows.append({**meta, "rank": r, "sti": sti})
        for i, j in itertools.permutations(range(len(store.tasks)), 2):
            pair_rows.append({**meta, "rank": r, "task": store.tasks[i], "task_b": store.tasks[j],
                              "sti": float(pair[i, j])})
    return pd.DataFrame(rows, columns=STI_COLUMNS), pd.DataFrame(pair_rows, columns=PAIR_COLUMNS)


def merge(store: FactorStore, method: str, *, runner: Runner | None = None, polar: str = "auto", topk: str = "auto",
          sink: Callable[[str, torch.Tensor], None] | None = None, progress: Progress | None = None, **knobs):
    """`analysis.merging.merge(tvs, method, **knobs)` with one job per parameter.

    Every method without data qualifies (an evaluator lives in one process:
    the data-aware methods are refused with the reason). A method's
    whole-model `prepare` pass (TIES' model-wide trim threshold with
    scope='model', EMR's rescalers, LiNeS' norm ratio) runs in the driver as
    in `analysis.merging.engine.run`, and its small result goes to every job.
    Returns the same `MergeResult`, or with `sink(name, delta)` passes each
    tensor on as it arrives and returns None."""
    from analysis.merging import POLAR_SOLVERS, TOPK_SOLVERS, MergeResult, get_method
    runner = runner or Runner()
    spec = get_method(method)
    tvs = store.tvs
    params = spec.validate(knobs, len(tvs.tasks))
    if polar not in POLAR_SOLVERS:
        raise HyperparameterError(f"{method}: polar solver {polar!r} is not one of {list(POLAR_SOLVERS)}")
    if topk not in TOPK_SOLVERS:
        raise HyperparameterError(f"{method}: top-k solver {topk!r} is not one of {list(TOPK_SOLVERS)}")
    if spec.needs.labelled_data or spec.needs.activations or spec.needs.gradients:
        raise ValidationError(f"{method} needs labelled data (an evaluator in one process); it does not split into "
                              "per-parameter jobs: use analysis.merging.merge")
    directory = None
    if spec.needs.spectra:
        directory = str(store.directory)
        if store.max_rank_fraction < 1.0:
            if "rank_fraction" not in params:
                raise ValidationError(f"{method} may read every singular direction; this store keeps the top "
                                      f"max_rank_fraction = {store.max_rank_fraction} only")
            store.check_fraction(params["rank_fraction"])
    covered = set(tvs.param_names if spec.covers is None else spec.covers(tvs, params))
    if spec.needs.spectra:
        outside = [n for n in tvs.param_names if n in covered and n not in store.names]
        if outside:
            raise ValidationError(f"{method} decomposes {outside[0]!r}, which this factor store does not cover; "
                                  "compute the spectra with include_embeddings=True")
    recipe = store.recipe or recipe_of(tvs)
    state = None
    if spec.prepare is not None:
        # the method's whole-model pass (TIES' model-wide trim threshold, EMR's rescalers, LiNeS' norm ratio)
        # runs here, once, in the memory its `peak_memory` declares; its small result goes to every job
        from analysis.merging import MergeContext, MergeInputs
        inputs = MergeInputs(tvs, device=runner.device if runner.backend == "off" else "cpu", persist=False)
        cache = _JobFactors(store, tvs, store.svd_method, store.tol) if spec.needs.spectra else None
        ctx = MergeContext(device=inputs.device, inputs=inputs, cache=cache, polar=polar, topk=topk, memo=inputs.memo)
        state = spec.prepare(inputs, params, ctx)
    jobs = [(n, (recipe, directory, store.tasks, store.max_rank_fraction, method, params, n, n in covered,
                 runner.device, polar, store.svd_method, store.tol, state, topk))
            for n in tvs.param_names]
    out = {}
    emit = sink if sink is not None else out.__setitem__
    for name, delta in runner.map(_merge_job, jobs, progress):
        emit(name, delta)
    if sink is not None:
        return None
    ordered = {n: out[n] for n in tvs.param_names}
    if spec.per_task:
        own = {t: {n: ordered[n][i] for n in ordered} for i, t in enumerate(tvs.tasks)}
        return MergeResult(spec.name, params, tvs.tasks, own=own)
    return MergeResult(spec.name, params, tvs.tasks, shared=ordered)


__all__ = ["BACKENDS", "ENV_VAR", "DistributedError", "FactorStore", "Runner", "SetRecipe", "backend",
           "compute_spectra", "connect", "factor_path", "merge", "recipe_of", "require_ray", "sti_tables"]
