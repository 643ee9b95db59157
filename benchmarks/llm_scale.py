"""Benchmark: a LLaMA-architecture set on disk through spectra + STI + a TSV-M
merge, in one process and on Ray with N workers, in the same run.

    python benchmarks/llm_scale.py                          # >= 0.5 B parameters per model, T = 4, 2 Ray workers
    python benchmarks/llm_scale.py --layers 2 --hidden 256  # smoke run (minutes on 2 CPU cores)
    python benchmarks/llm_scale.py --plan                   # sizes, disk and memory estimates only

The set (built here, once per configuration, in a subprocess so its memory is
not measured): a `transformers.LlamaConfig` model with random initialisation,
bf16, tied embeddings (as Llama 3.2 1B), saved with save_pretrained in
512 MB shards; T fine-tunes = base + a rank-16 part with a decaying spectrum +
small noise per matrix (noise only on vectors and embeddings), built one at a
time (the base and one fine-tune in RAM, never the set). Default shape:
hidden 1536, intermediate 4096, 20 layers, 12 heads (4 KV), vocab 32000:
about 0.55 B parameters per model.

Each path runs analysis.distributed with the same jobs: the factors of every
matrix (top ⌊f·k⌋ directions kept, f = the merge's rank fraction, all singular
values), the STI tables at f, and TSV-M at f with every merged tensor written
as bf16 weights (base + delta) to 256 MB safetensors shards as it arrives.
"single" runs them in this process with torch using N threads; "ray" starts a
local Ray with N CPUs (one thread per task). Printed: wall time per phase,
the ratio single / ray (with and without Ray's start), whether both paths
agree (singular values bit for bit, STI to 1e-6, and the merged weights: identical, or how many
differ and by how much: torch's thread count changes float rounding), and the
peak memory of the process tree (this process and every descendant: Ray's
raylet, GCS and workers), sampled from /proc every 0.2 s:
  - Σ RSS, which includes the file pages of the memory-mapped checkpoints
    each process has touched (clean page cache the kernel drops under
    pressure; it grows with what was read, up to the set's size);
  - Σ anonymous + shared memory (Pss_Anon + Pss_Shmem of smaps_rollup:
    heaps, tensors, Ray's object store, a shared page counted once), the
    memory the processes own; it is checked against the stated bound: the tree's baseline + per concurrent job the largest job's
    working set (32·T·m·n bytes for a decomposed m×n matrix, as
    SpectralCache plans; (4·T + 22)·numel for a tensor merged by the mean
    rule: its T float32 deltas, the one being read and the mean), the
    largest ones running together, + the merge's shard buffer.
Linux only (/proc). Disk: the set, two factor stores and two merged models;
the estimate is printed first and the run refuses to start without room.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import distributed as dist  # noqa: E402
from analysis.paths import cache_root  # noqa: E402
from analysis.taskvectors import TaskVectorSet, as_matrix  # noqa: E402

GIB = 2**30
SHARD_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- the set
def llama_config(args):
    from transformers import LlamaConfig
    heads = args.heads or max(1, args.hidden // 128)
    kv = args.kv_heads or max(1, heads // 3)
    inter = args.intermediate or 64 * round(args.hidden * 8 / 3 / 64)
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                       num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv,
                       tie_word_embeddings=True, dtype="bfloat16")


def shapes_of(cfg) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if "lm_head" not in k}   # tied


def set_dir(args, cfg) -> Path:
    tag = hashlib.blake2b(json.dumps([cfg.to_dict(), args.tasks, args.seed], sort_keys=True, default=str).encode(),
                          digest_size=6).hexdigest()
    base = Path(args.dir).expanduser() if args.dir else cache_root() / "bench"
    return base / f"llm_scale-L{cfg.num_hidden_layers}-h{cfg.hidden_size}-T{args.tasks}-{tag}"


def task_delta(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """A fine-tuning-like delta: rank-16 part with a decaying spectrum + noise (matrices); noise elsewhere."""
    noise = 2e-4 * torch.randn(shape, generator=g)
    if len(shape) != 2 or "embed" in name:
        return noise
    m, n = shape
    r = min(16, m, n)
    low = torch.randn(m, r, generator=g) @ (torch.linspace(1, 0.1, r).unsqueeze(1) * torch.randn(r, n, generator=g))
    return noise + 1e-2 * low / math.sqrt(n)


def build(args) -> None:
    """Write base + T fine-tunes (run in a subprocess: its memory is not the benchmark's)."""
    from transformers import LlamaForCausalLM
    cfg = llama_config(args)
    out = set_dir(args, cfg)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out / "base", max_shard_size="512MB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"  base written ({time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        for t in range(args.tasks):
            g = torch.Generator().manual_seed(args.seed * 1000 + t + 1)
            for name, p in model.named_parameters():
                p.copy_((base[name].float() + task_delta(name, tuple(p.shape), g)).to(p.dtype))
            model.save_pretrained(out / f"task{t}", max_shard_size="512MB")
            print(f"  task{t} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "COMPLETE").write_text(json.dumps(cfg.to_dict(), default=str))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------- memory of the process tree
def _memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous + shared PSS) of one process in bytes; PSS splits a page shared by n processes
    n ways (Ray's object store is mapped by several), so the tree's sum counts each page once."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss_Anon", "Pss_Shmem"):
                    fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        return 0, 0
    return fields.get("Rss", 0), fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class TreeMemory:
    """Peak Σ RSS and Σ (Pss_Anon + Pss_Shmem) over this process and its descendants, sampled."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.root = os.getpid()
        self._stop = threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> tuple[int, int, int]:
        rss = owned = 0
        pids = tree_pids(self.root)
        for pid in pids:
            r, o = _memory(pid)
            rss += r
            owned += o
        return rss, owned, len(pids)

    def reset(self) -> None:
        self.peak_rss = self.peak_owned = self.procs = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, owned, n = self.sample()
            if rss > self.peak_rss:
                self.peak_rss = rss
            if owned > self.peak_owned:
                self.peak_owned, self.procs = owned, n
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- one path
class ShardWriter:
    """Merge sink: base + delta in the base's dtype, written in ~256 MB safetensors shards."""

    def __init__(self, tvs: TaskVectorSet, out: Path):
        self.tvs, self.out, self.buffer, self.bytes, self.files = tvs, out, {}, 0, []
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, delta: torch.Tensor) -> None:
        base = self.tvs.base_tensor(name)
        merged = (base.float() + delta.to(torch.float32)).to(base.dtype)
        self.buffer[name] = merged
        self.bytes += merged.numel() * merged.element_size()
        if self.bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file
        if self.buffer:
            path = self.out / f"merged-{len(self.files):05d}.safetensors"
            save_file(self.buffer, str(path))
            self.files.append(path)
        self.buffer, self.bytes = {}, 0


def run_path(label: str, tvs: TaskVectorSet, runner: dist.Runner, work: Path, f: float, memory: TreeMemory,
             progress_every: float) -> dict:
    res = {"label": label}
    last = [0.0]

    def progress(phase):
        def report(done, total, name):
            if done == total or time.perf_counter() - last[0] > progress_every:
                last[0] = time.perf_counter()
                print(f"    {label:6s} {phase:7s} {done:4d}/{total}  {name}", flush=True)
        return report

    t = time.perf_counter()
    store = dist.compute_spectra(tvs, work / f"factors-{label}", runner=runner, max_rank_fraction=f,
                                 progress=progress("spectra"))
    res["spectra_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res["sti"], res["pairs"] = dist.sti_tables(store, f, runner=runner, progress=progress("sti"))
    res["sti_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sink = ShardWriter(tvs, work / f"merged-{label}")
    dist.merge(store, "tsv_m", runner=runner, rank_fraction=f, sink=sink, progress=progress("merge"))
    sink.flush()
    res["merge_s"] = time.perf_counter() - t
    res["total_s"] = res["spectra_s"] + res["sti_s"] + res["merge_s"]
    res["store"], res["merged_dir"] = store, sink.out
    res["peak_rss"], res["peak_owned"], res["procs"] = memory.peak_rss, memory.peak_owned, memory.procs
    return res


def merged_difference(a: Path, b: Path) -> dict:
    """How two merged models differ, read one tensor at a time: tensors compared, tensors not bit-identical,
    weights that differ (share of all), and the largest |Δ| relative to its tensor's max magnitude."""
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out
    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        raise SystemExit(f"the merged models hold different tensors: {sorted(set(ia) ^ set(ib))[:5]}")
    res = {"tensors": len(ia), "tensors_differing": 0, "weights": 0, "weights_differing": 0, "max_rel": 0.0}
    for name in ia:
        with safe_open(str(ia[name]), framework="pt") as ha, safe_open(str(ib[name]), framework="pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        res["weights"] += x.numel()
        differ = int(x.ne(y).sum())
        if differ:
            res["tensors_differing"] += 1
            res["weights_differing"] += differ
            res["max_rel"] = max(res["max_rel"], float((x - y).abs().max()) / max(float(x.abs().max()), 1e-30))
    return res


# --------------------------------------------------------------------------- main
def estimate(shapes: dict, tasks: int, f: float) -> dict:
    """Sizes on disk and each job's working set (bytes), from the shapes alone."""
    from analysis.svd import truncation_rank
    params = sum(math.prod(s) for s in shapes.values())
    store, jobs = 0, []
    for name, s in shapes.items():
        if len(s) == 2 and "embed" not in name:
            m, n = s
            k = min(m, n)
            kept = truncation_rank(k, f)
            store += 4 * tasks * (m * kept + k + kept * n)
            jobs.append(32 * tasks * m * n)            # the float64 Gram route, as SpectralCache plans it
        else:
            # T float32 deltas + the one being read (bf16 + float32 copies) + the mean
            jobs.append((4 * tasks + 22) * math.prod(s))
    return {"params": params, "model_bytes": 2 * params, "set_bytes": (tasks + 1) * 2 * params, "store_bytes": store,
            "jobs": sorted(jobs, reverse=True)}


def print_rows(results: dict) -> None:
    print(f"\n{'path':6s} {'spectra':>9s} {'STI':>8s} {'TSV-M':>8s} {'total':>9s} {'+start':>9s}   "
          f"{'peak ΣRSS':>10s} {'peak owned':>11s} {'bound':>8s}  procs", flush=True)
    for path, r in results.items():
        ok = "≤" if r["peak_owned"] <= r["bound"] else "> (over!)"
        print(f"{path:6s} {r['spectra_s']:8.1f}s {r['sti_s']:7.1f}s {r['merge_s']:7.1f}s {r['total_s']:8.1f}s "
              f"{r['total_s'] + r['start_s']:8.1f}s   {r['peak_rss'] / GIB:8.2f}G {r['peak_owned'] / GIB:9.2f}G {ok} "
              f"{r['bound'] / GIB:5.2f}G  {r['procs']}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 8/3 · hidden, a multiple of 64")
    ap.add_argument("--heads", type=int, default=None, help="default: hidden / 128")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: heads / 3")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs (= workers); the single path uses as many threads")
    ap.add_argument("--rank-fraction", type=float, default=None, help="default 1/T (TSV-M's default)")
    ap.add_argument("--dir", default=None, help="where the set is built (default: $MERGESCOPE_CACHE/bench)")
    ap.add_argument("--only", choices=("single", "ray"), default=None, help="run one path only")
    ap.add_argument("--delete-set", action="store_true", help="remove the built set at the end")
    ap.add_argument("--plan", action="store_true", help="print the set's size, the disk needed and the largest "
                    "jobs' working sets, then stop")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        return build(args)
    if not Path("/proc/self/smaps_rollup").is_file():
        raise SystemExit("this benchmark reads process memory from /proc/<pid>/smaps_rollup (Linux 4.14+)")

    cfg = llama_config(args)
    f = args.rank_fraction or 1.0 / args.tasks
    shapes = shapes_of(cfg)
    est = estimate(shapes, args.tasks, f)
    folder = set_dir(args, cfg)
    paths = ["single", "ray"] if args.only is None else [args.only]
    built = (folder / "COMPLETE").is_file()
    need = (0 if built else est["set_bytes"]) + len(paths) * (est["store_bytes"] + est["model_bytes"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    print(f"LLaMA set: {est['params'] / 1e9:.3f} B parameters per model (hidden {cfg.hidden_size}, intermediate "
          f"{cfg.intermediate_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
          f"{cfg.num_key_value_heads} KV, vocab {cfg.vocab_size}, tied embeddings), bf16, base + T = {args.tasks}")
    print(f"disk: set {est['set_bytes'] / GIB:.2f} GiB ({'built' if built else 'to build'}) + per path a factor "
          f"store {est['store_bytes'] / GIB:.2f} GiB (top {f:g} of U, V) and a merged model "
          f"{est['model_bytes'] / GIB:.2f} GiB; needed now {need / GIB:.2f} GiB, free {free / GIB:.1f} GiB "
          f"under {folder.parent}")
    print(f"memory: the largest jobs' working sets {', '.join(f'{j / GIB:.2f}' for j in est['jobs'][:args.workers])} "
          f"GiB (+ the process tree's baseline and a {2 * SHARD_BYTES / GIB:.2f} GiB shard buffer)")
    if args.plan:
        return
    if need > free:
        raise SystemExit(f"not enough disk under {folder.parent}: {need / GIB:.2f} GiB needed, {free / GIB:.1f} GiB "
                         "free; pass --dir elsewhere or --only single")
    if not built:
        print(f"building the set in {folder} (a subprocess, one model at a time)", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", *(argv if argv is not None else sys.argv[1:])],
                       check=True)
        print(f"built in {time.perf_counter() - t:.0f} s")
    set_bytes = dir_bytes(folder)
    print(f"set on disk: {set_bytes / GIB:.2f} GiB in {folder}")

    tasks = {f"task{t}": folder / f"task{t}" for t in range(args.tasks)}
    tvs = TaskVectorSet.from_checkpoints(folder / "base", tasks)
    work = folder.parent / f"{folder.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    memory = TreeMemory()
    results = {}
    try:
        for path in paths:
            memory.reset()
            start_s = 0.0
            if path == "single":
                torch.set_num_threads(args.workers)
                runner = dist.Runner("off", device="cpu")
                baseline = memory.sample()[1]
                workers = 1
            else:
                t = time.perf_counter()
                ray = dist.connect(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                                   object_store_memory=2 * GIB)
                runner = dist.Runner("ray", device="cpu")
                started = runner.warm_up()          # workers up, torch imported: part of the start, not the work
                start_s = time.perf_counter() - t
                baseline = memory.sample()[1]
                workers = args.workers
            memory.reset()
            print(f"\n== {path}: {workers} job(s) at a time, tree baseline {baseline / GIB:.2f} GiB owned"
                  + (f", Ray and {started} workers started in {start_s:.1f} s" if path == "ray" else ""), flush=True)
            res = run_path(path, tvs, runner, work, f, memory, progress_every=30.0)
            res["start_s"], res["baseline"], res["workers"] = start_s, baseline, workers
            # the `workers` largest jobs at once, and the merge's shard buffer with the tensor arriving
            res["bound"] = baseline + sum(est["jobs"][:workers]) + 2 * SHARD_BYTES
            results[path] = res
            print_rows({path: res})   # each path's figures as soon as it ends (a long run may be stopped later)
            if path == "ray":
                ray.shutdown()
    finally:
        memory.stop()

    if len(results) > 1:   # each row was printed as its path ended; together here
        print_rows(results)
    print(f"set on disk {set_bytes / GIB:.2f} GiB; float32 deltas of the set {est['params'] * 4 * args.tasks / GIB:.2f} "
          f"GiB; largest jobs' working sets {', '.join(f'{j / GIB:.2f}' for j in est['jobs'][:2])} GiB")
    if len(results) == 2:
        s, r = results["single"], results["ray"]
        print(f"single / ray: {s['total_s'] / r['total_s']:.2f}x (computation), "
              f"{s['total_s'] / (r['total_s'] + r['start_s']):.2f}x (with Ray's start); per phase spectra "
              f"{s['spectra_s'] / r['spectra_s']:.2f}x, STI {s['sti_s'] / r['sti_s']:.2f}x, "
              f"TSV-M {s['merge_s'] / r['merge_s']:.2f}x")
        same_s = all(torch.equal(s["store"].singular_values(n), r["store"].singular_values(n))
                     for n in s["store"].names)
        sti_rel = float(((s["sti"]["sti"] - r["sti"]["sti"]).abs() / s["sti"]["sti"].abs().clip(lower=1e-30)).max())
        d = merged_difference(s["merged_dir"], r["merged_dir"])
        merged = ("identical" if not d["tensors_differing"] else
                  f"{d['tensors_differing']} differ in {d['weights_differing']} of {d['weights']} weights "
                  f"({100 * d['weights_differing'] / d['weights']:.4f} %), max |Δ| {d['max_rel']:.1e} of the "
                  f"tensor's max magnitude: float rounding, as torch runs the single path on {args.workers} "
                  "threads and each Ray task on 1 (benchmarks/merge_threads.py shows the same in one process)")
        print(f"agreement: singular values {'identical' if same_s else 'DIFFERENT'}; STI max relative difference "
              f"{sti_rel:.1e}; merged weights ({d['tensors']} tensors) {merged}")
    shutil.rmtree(work, ignore_errors=True)
    if args.delete_set:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder}")
    else:
        print(f"the set stays for the next run: {folder} (rm -rf it, or pass --delete-set)")


if __name__ == "__main__":
    main()
