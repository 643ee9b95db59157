"""Re-merge time after a rank-fraction change: cached factors vs from scratch.

Synthetic set shaped like CLIP ViT-B/32's vision tower: T tasks, `--blocks`
blocks of 2304×768 (qkv), 768×768 (out proj), 3072×768 (fc1), 768×3072 (fc2)
matrices plus their biases (12 blocks = the real model). Deltas are random
with a decaying spectrum (σ_i ∝ 1/(1+i/32)), like fine-tuning deltas.

For `tsv_m` and `iso_cts` it times:
  scratch   the naive reference route: per-task, per-layer torch.linalg.svd,
            polar factors by SVD (what the papers' code does), no cache;
  cached    `analysis.merging.merge` with a warm SpectralCache (and, for Iso,
            the memoised SVD of the task sum), after a rank-fraction change;
and checks both give the same merged delta (relative Frobenius error). For
tsv_m it also compares the polar solvers (exact SVD vs Newton–Schulz).

    python benchmarks/merge.py --blocks 2            # what ran is printed first
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info, get_device  # noqa: E402
from analysis.merging import merge  # noqa: E402
from analysis.merging.iso import split_rank  # noqa: E402
from analysis.merging.tsv import tsv_rank  # noqa: E402
from analysis.spectra import SpectralCache  # noqa: E402
from analysis.taskvectors import TaskVectorSet  # noqa: E402

SHAPES = {"attn.in_proj_weight": (2304, 768), "attn.out_proj.weight": (768, 768),
          "mlp.c_fc.weight": (3072, 768), "mlp.c_proj.weight": (768, 3072)}


def synthetic_set(n_tasks: int, blocks: int, seed: int = 0) -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    base, tasks = {}, {f"task{t}": {} for t in range(n_tasks)}
    for b in range(blocks):
        for suffix, (m, n) in SHAPES.items():
            name = f"visual.transformer.resblocks.{b}.{suffix}"
            base[name] = torch.zeros(m, n)
            base[name.replace("weight", "bias")] = torch.zeros(m)
            r = min(m, n)
            decay = 1.0 / (1.0 + torch.arange(r) / 32.0)
            for t in range(n_tasks):
                a = torch.randn(m, r, generator=g) / math.sqrt(m)
                c = torch.randn(r, n, generator=g) / math.sqrt(n)
                tasks[f"task{t}"][name] = 1e-3 * (a * decay) @ c
                tasks[f"task{t}"][name.replace("weight", "bias")] = 1e-3 * torch.randn(m, generator=g)
    return TaskVectorSet.from_state_dicts(base, tasks)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU_TIMES: list[float] = []   # process CPU seconds of each timed call (all threads), beside wall time


def timed(fn, device, repeat=1):
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        CPU_TIMES.append(time.process_time() - c0)
    return out, times


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


NAIVE_SVD_RETRIES = [0]   # float32 SVDs of the reference route that failed to converge


def _polar_svd(x):
    # the papers' route is a plain float32 SVD; it can fail to converge on these nearly
    # orthonormal concatenations (it did on Iso-CTS's V* at 12 blocks), so retry in float64
    try:
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        NAIVE_SVD_RETRIES[0] += 1
        p, _, qh = (t.float() for t in torch.linalg.svd(x.double(), full_matrices=False))
    return p @ qh


def naive_tsv_m(tvs, f, alpha, device):
    """Reference route: SVD of every task matrix, every time."""
    out, T = {}, len(tvs.tasks)
    for name in tvs.names_of_kind("matrix"):
        us, ss, vhs = [], [], []
        for task in tvs.tasks:
            u, s, vh = torch.linalg.svd(tvs.delta(task, name).to(device), full_matrices=False)
            q = tsv_rank(f, s.shape[0], T, "cap")
            us.append(u[:, :q]); ss.append(s[:q]); vhs.append(vh[:q])
        u, s, vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
        out[name] = alpha * (_polar_svd(u) * s) @ _polar_svd(vh)
    return out


def naive_iso_cts(tvs, c, alpha, device):
    out, T = {}, len(tvs.tasks)
    for name in tvs.names_of_kind("matrix"):
        taus = tvs.deltas(name).to(device)
        u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
        common, k = split_rank(s.shape[0], T, c)
        us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
        for t in range(T):
            resid = taus[t] - u[:, :common] @ (u[:, :common].T @ taus[t])
            ru, rs, rvh = torch.linalg.svd(resid, full_matrices=False)
            us.append(ru[:, :k]); ss.append(rs[:k]); vhs.append(rvh[:k])
        uu, vv = _polar_svd(torch.cat(us, 1)), _polar_svd(torch.cat(vhs, 0))
        out[name] = alpha * torch.cat(ss).mean() * (uu @ vv)
    return out


def rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[k].double().cpu() - b[k].double().cpu()).norm() ** 2) for k in b)
    den = sum(float(b[k].double().cpu().norm() ** 2) for k in b)
    return math.sqrt(num / den)


def profile_iso(tvs, cache, device) -> None:
    """Where one Iso-CTS re-merge (c 0.8 -> 0.65, default solvers) spends its time: Python functions
    (cProfile, by own time) and torch operators (torch.profiler, by self CPU and device time)."""
    import cProfile
    import pstats

    merge(tvs, "iso_cts", common_fraction=0.8, cache=cache)
    prof = cProfile.Profile()
    sync(device)
    prof.enable()
    merge(tvs, "iso_cts", common_fraction=0.65, cache=cache)
    sync(device)
    prof.disable()
    print("\n== cProfile of one Iso-CTS re-merge (c = 0.65), by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as tp:
        merge(tvs, "iso_cts", common_fraction=0.55, cache=cache)
        sync(device)
    print("== torch.profiler, by self CPU time")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    if device.type == "cuda":
        print("== torch.profiler, by self device time")
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=12, help="number of transformer blocks (12 = ViT-B/32)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: analysis.device.get_device())")
    ap.add_argument("--repeat", type=int, default=3, help="cached re-merges timed per method")
    ap.add_argument("--skip-naive", action="store_true", help="skip the from-scratch reference timing")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, one Iso-CTS re-merge (default solvers) under cProfile and torch.profiler")
    ap.add_argument("--keep", default="full", help="the SpectralCache's keep: full (as measured before keep existed) "
                    "or auto (the app's default: top K of matrices past rank 512; Iso-CTS then reads the deltas)")
    ap.add_argument("--page-like", action="store_true",
                    help="time moves as the Merge page makes them: a resident set (its memos of whole-set "
                         "products), and each route's first merge untimed (the page's first render)")
    ap.add_argument("--tsv-polar", default="exact,gram,newton_schulz", help="TSV-M polar solvers to time")
    ap.add_argument("--iso-routes", default="exact/exact,gram/exact,newton_schulz/exact,newton_schulz/subspace,"
                    "gram/subspace", help="Iso-CTS (polar/top-k) solver pairs to time; exact/exact is the baseline")
    args = ap.parse_args(argv)
    device = get_device(args.device)
    info = device_info(device)
    log(f"device: {info['name']} ({device}), torch {info['torch']}, threads {info['cpu_threads']}")
    print(f"set: T={args.tasks}, blocks={args.blocks} x {list(SHAPES.values())} (+ biases)")
    t0 = time.perf_counter()
    tvs = synthetic_set(args.tasks, args.blocks)
    if args.page_like:
        tvs.keep_resident()      # as the app keeps a set that fits
    log(f"built synthetic set in {time.perf_counter() - t0:.1f} s")

    cache = SpectralCache(tvs, device=device, persist=False, keep=args.keep)
    _, t_fac = timed(cache.compute, device)
    log(f"SpectralCache (keep={args.keep}): all per-task factors in {t_fac[0]:.2f} s (once per set; "
        f"compute_count={cache.compute_count})")
    T = args.tasks
    rows = []
    # ---- tsv_m: warm at f = 1/T, then change the rank fraction
    merge(tvs, "tsv_m", rank_fraction=1 / T, cache=cache, polar="exact")
    fractions = [0.05, 0.08, 0.1, 0.03, 0.06][: args.repeat]
    for solver in args.tsv_polar.split(","):
        times = []
        if args.page_like:
            merge(tvs, "tsv_m", rank_fraction=1 / T, cache=cache, polar=solver)   # the page's first render
        for f in fractions:
            _, t = timed(lambda: merge(tvs, "tsv_m", rank_fraction=f, alpha=1.0, cache=cache, polar=solver), device)
            times.append(t[0])
        rows.append(("tsv_m", f"cached, polar={solver}", statistics.median(times), len(times),
                     statistics.median(CPU_TIMES[-len(times):])))
        log(f"tsv_m cached re-merge, polar={solver}: {times}")
    f = fractions[0]
    exact = merge(tvs, "tsv_m", rank_fraction=f, cache=cache, polar="exact")
    names = tvs.names_of_kind("matrix")
    for solver in [p for p in args.tsv_polar.split(",") if p != "exact"]:
        fast = merge(tvs, "tsv_m", rank_fraction=f, cache=cache, polar=solver)
        print(f"tsv_m f={f}: polar={solver} vs exact polar, relative error over all matrices: "
              f"{rel_err({k: fast[k] for k in names}, {k: exact[k] for k in names}):.2e}")
    # ---- iso_cts: warm (sum SVDs memoised), then change the common fraction
    merge(tvs, "iso_cts", common_fraction=0.8, cache=cache, polar="exact")
    # (polar solver, top-k solver): the exact baseline, the CPU default (gram, exact: MRRR where it pays), the
    # CUDA default (Newton-Schulz, subspace iteration), and each change alone
    routes = [tuple(r.split("/")) for r in args.iso_routes.split(",")]
    routes = [("exact", "exact")] + [r for r in routes if r != ("exact", "exact")]
    for solver, topk in routes:
        times = []
        if args.page_like:
            merge(tvs, "iso_cts", common_fraction=0.8, cache=cache, polar=solver, topk=topk)   # first render
        for c in [0.7, 0.9, 0.6, 0.75, 0.85][: args.repeat]:
            _, t = timed(lambda: merge(tvs, "iso_cts", common_fraction=c, cache=cache, polar=solver, topk=topk),
                         device)
            times.append(t[0])
        rows.append(("iso_cts", f"cached, polar={solver}, topk={topk}", statistics.median(times), len(times),
                     statistics.median(CPU_TIMES[-len(times):])))
        log(f"iso_cts cached re-merge, polar={solver}, topk={topk}: {times}")
    ex = merge(tvs, "iso_cts", common_fraction=0.7, cache=cache, polar="exact", topk="exact")
    for solver, topk in routes[1:]:
        other = merge(tvs, "iso_cts", common_fraction=0.7, cache=cache, polar=solver, topk=topk)
        print(f"iso_cts c=0.7: polar={solver}, topk={topk} vs exact/exact relative error: "
              f"{rel_err({k: other[k] for k in names}, {k: ex[k] for k in names}):.2e}")
    count = cache.compute_count
    if args.profile:
        profile_iso(tvs, cache, device)
    if not args.skip_naive:
        naive, t = timed(lambda: naive_tsv_m(tvs, f, 1.0, device), device)
        rows.append(("tsv_m", "from scratch (naive SVD loop)", t[0], 1, CPU_TIMES[-1]))
        log(f"tsv_m naive: {t[0]:.2f} s")
        print(f"tsv_m f={f}: cached (exact polar) vs naive relative error: "
              f"{rel_err({k: exact[k] for k in names}, naive):.2e}")
        naive, t = timed(lambda: naive_iso_cts(tvs, 0.7, 1.0, device), device)
        rows.append(("iso_cts", "from scratch (naive SVD loop)", t[0], 1, CPU_TIMES[-1]))
        log(f"iso_cts naive: {t[0]:.2f} s (float32 SVDs that failed to converge and were redone in float64: "
            f"{NAIVE_SVD_RETRIES[0]})")
        ours = merge(tvs, "iso_cts", common_fraction=0.7, cache=cache, polar="exact", topk="exact")
        print(f"iso_cts c=0.7: cached vs naive relative error: {rel_err({k: ours[k] for k in names}, naive):.2e}")
    assert cache.compute_count == count, "a rank change recomputed an SVD"
    print()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores (wall times include waiting for the CPU)")
    print("| method | route | wall s (median) | process CPU s (median) | runs |")
    print("|---|---|---|---|---|")
    for method, route, sec, n, cpu in rows:
        print(f"| {method} | {route} | {sec:.3f} | {cpu:.3f} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
