"""The work issue 12 removed from the critical path, on this machine (CPU by default).

1. Deltas read per Merge slider move. A slider move on the Merge page is one
   `merge(...)` call; it is made --moves times on the same set, counting
   checkpoint tensors read (`tvs.reads`), `torch.isfinite` calls of the
   value checks and wall time, for
   - "before": a streaming set whose value checks are forgotten after every
     move, i.e. every move re-reads and re-checks every task vector, as the
     code did before this change (it made T+1 isfinite calls per parameter,
     this one makes 2: same data checked, fewer calls);
   - "streaming now": the same, checks kept (a set too large to keep);
   - "resident (after)": `tvs.keep_resident(device)`, what the app's
     workspace uses.
   The baseline is the "before" median move, measured in the same run.
2. SpectralCache.compute with and without the blocking write: the factors
   of a synthetic set with persist=True, timed until compute() returns (the
   file is written in the background) and until the file is on disk
   (compute() + flush(): what compute() cost when it wrote in line). The
   baseline is the blocking variant.

    python benchmarks/work_removed.py                   # quick demo if built, else a synthetic MiniLM-shaped set
    python benchmarks/work_removed.py --set synthetic --blocks 2 --shape vit --spectra-shape vit --spectra-blocks 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import analysis.taskvectors as taskvectors  # noqa: E402
from analysis.device import device_info, get_device  # noqa: E402
from analysis.merging import merge  # noqa: E402
from analysis.spectra import SpectralCache  # noqa: E402
from analysis.taskvectors import TaskVectorSet  # noqa: E402


class IsfiniteCounter:
    """Counts torch.isfinite calls made by analysis.taskvectors (the value checks)."""

    def __init__(self):
        self.calls = 0
        self._real = torch.isfinite

    def __enter__(self):
        real = self._real

        def counted(t):
            self.calls += 1
            return real(t)
        taskvectors.torch.isfinite = counted
        return self

    def __exit__(self, *exc):
        taskvectors.torch.isfinite = self._real


def synthetic_files(folder: Path, blocks: int, tasks: int, shape: str) -> tuple[Path, dict]:
    """A base and `tasks` fine-tuned checkpoints as safetensors files (reads are real file reads)."""
    names = [f"task{t}" for t in range(tasks)]
    if (folder / "base.safetensors").is_file():          # written by an earlier call of this run
        return folder / "base.safetensors", {t: folder / f"{t}.safetensors" for t in names}
    from spectra import synthetic_set
    tvs = synthetic_set(blocks, tasks, shape=shape)
    base = {n: tvs.base.get(n) for n in tvs.base.keys()}
    save_file(base, folder / "base.safetensors")
    paths = {}
    for t in tvs.tasks:
        save_file({n: (base[n] + tvs.delta(t, n)).contiguous() for n in base}, folder / f"{t}.safetensors")
        paths[t] = folder / f"{t}.safetensors"
    return folder / "base.safetensors", paths


def open_set(kind: str, tmp: Path, args) -> tuple[TaskVectorSet, str]:
    if kind == "demo":
        from analysis.zoo import DemoNotBuilt, find_build
        try:
            folder = find_build(args.cache_dir, quick=True if args.set == "auto" else None)
        except DemoNotBuilt as exc:
            raise LookupError(str(exc)) from exc
        import json
        tasks = json.loads((folder / "manifest.json").read_text())["tasks"]
        tvs = TaskVectorSet.from_checkpoints(folder / "pretrained",
                                             {t: folder / "tasks" / t / "finetuned" for t in tasks})
        return tvs, f"demo build {folder.name}"
    base, paths = synthetic_files(tmp, args.blocks, args.tasks, args.shape)
    return TaskVectorSet.from_checkpoints(base, paths), f"synthetic {args.shape}-shaped, {args.blocks} blocks"


def merge_moves(tvs: TaskVectorSet, method: str, device, alphas, forget_checks: bool = False) -> list[dict]:
    rows = []
    for a in alphas:
        if forget_checks:
            tvs._checked.clear()        # the code before this change re-checked every read
        reads = tvs.reads
        with IsfiniteCounter() as checks:
            t0 = time.perf_counter()
            merge(tvs, method, device=device, alpha=a)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        rows.append({"alpha": a, "reads": tvs.reads - reads, "isfinite": checks.calls, "wall_s": wall})
    return rows


def reads_per_move(args, tmp: Path, device) -> None:
    kinds = ["demo", "synthetic"] if args.set == "auto" else [args.set]
    for kind in kinds:
        try:
            streaming, label = open_set(kind, tmp, args)
            break
        except LookupError as exc:
            print(f"({kind} set unavailable: {exc})")
    before, _ = open_set(kind, tmp, args)
    resident, _ = open_set(kind, tmp, args)
    where = resident.keep_resident(device)
    n_params, T = len(streaming.param_names), len(streaming.tasks)
    numel = streaming.stacked_bytes() // 4 // T
    print(f"\n== 1. deltas read per Merge slider move ({args.method} α), {label}: T={T}, {n_params} tensors, "
          f"{numel / 1e6:.1f} M parameters per model; resident on {where}")
    alphas = [round(0.3 + 0.05 * i, 2) for i in range(args.moves)]
    results = {"before: streaming, re-checked every move": merge_moves(before, args.method, device, alphas, True),
               "streaming now (checks kept)": merge_moves(streaming, args.method, device, alphas),
               "resident (after)": merge_moves(resident, args.method, device, alphas)}
    base = statistics.median(r["wall_s"] for r in results["before: streaming, re-checked every move"])
    print("| set | move | tensors read | isfinite calls | wall s | wall / before (median) |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        for i, r in enumerate(rows, 1):
            print(f"| {name} | {i} (α={r['alpha']}) | {r['reads']} | {r['isfinite']} | {r['wall_s']:.3f} | "
                  f"{r['wall_s'] / base:.2f}× |")
    later = [r["reads"] for r in results["resident (after)"][1:]]
    print(f"tensors read per move after the first: before {results['before: streaming, re-checked every move'][-1]['reads']}"
          f" -> after {max(later) if later else 'n/a'}")
    del streaming, resident, before



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["auto", "demo", "synthetic"], default="auto",
                    help="auto: the quick demo if built, else synthetic")
    ap.add_argument("--cache-dir", default=None, help="where to look for the demo build (default: the cache root)")
    ap.add_argument("--shape", choices=["minilm", "vit"], default="minilm", help="synthetic set shape")
    ap.add_argument("--blocks", type=int, default=6, help="synthetic set blocks (merge part)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--method", default="task_arithmetic", help="the Merge page method whose α moves")
    ap.add_argument("--moves", type=int, default=3, help="slider moves (merge calls) per set")
    ap.add_argument("--device", default=None)
    ap.add_argument("--spectra-shape", choices=["minilm", "vit"], default="minilm",
                    help="synthetic set of the spectra part (minilm: the demo backbone's shapes)")
    ap.add_argument("--spectra-blocks", type=int, default=6, help="blocks of the spectra part's set")
    ap.add_argument("--spectra-repeat", type=int, default=2)
    ap.add_argument("--skip-spectra", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 on a shared, loaded CPU: with 2 threads and the other core busy, "
                         "MKL's eigh was measured 300x slower here)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    info = device_info(device)
    print(f"device: {info['name']} ({device}), torch {info['torch']}, threads {info['cpu_threads']}, "
          f"load average {os.getloadavg()}")
    if not args.skip_merge:
        with tempfile.TemporaryDirectory(prefix="ms-work-") as tmp:
            reads_per_move(args, Path(tmp), device)

    if args.skip_spectra:
        return 0
    from spectra import synthetic_set
    tvs = synthetic_set(args.spectra_blocks, args.tasks, shape=args.spectra_shape)
    tvs.keep_resident("cpu")
    tvs.materialize()
    tvs.fingerprint(tvs.names_of_kind("matrix", "conv"))   # hashed once: not part of either timing
    print(f"\n== 2. SpectralCache.compute on a {args.spectra_shape}-shaped set, {args.spectra_blocks} blocks, T={args.tasks}, "
          f"persist=True, device {device}")
    rows = {"blocking write (before): compute + flush": [], "background write (after): compute returns": [],
            "…of which the write, flushed after": []}
    for _ in range(args.spectra_repeat):
        for blocking in (True, False):
            with tempfile.TemporaryDirectory(prefix="ms-spectra-") as d:
                cache = SpectralCache(tvs, device=device, cache_dir=d, keep="full")   # as measured before keep existed
                t0 = time.perf_counter()
                cache.compute()
                t1 = time.perf_counter()
                if blocking:
                    cache.flush()
                    rows["blocking write (before): compute + flush"].append(time.perf_counter() - t0)
                else:
                    rows["background write (after): compute returns"].append(t1 - t0)
                    t2 = time.perf_counter()
                    cache.flush()
                    rows["…of which the write, flushed after"].append(time.perf_counter() - t2)
                assert cache.path.is_file()
    base = statistics.median(rows["blocking write (before): compute + flush"])
    print("| SpectralCache | median s | runs | / baseline |")
    print("|---|---|---|---|")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {med / base:.2f}× |")
    print(f"\nload average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
