"""Decomposition routes for a rank-change re-merge, on the batches the app meets.

Iso-CTS re-decomposes, for every matrix and task, the projected residual
(I − U_c U_cᵀ) τ_t after a change of the common fraction c, and only its top
k = per_task triplets are used. The Spectra page's first render needs every
task matrix's singular values (and the kept directions). Both are batches of
small (768-ish) matrices, where cuSOLVER's eigh / SVD are latency-bound.

Timed on the ViT-12-shaped synthetic set of `benchmarks/merge.py` (T tasks,
4 matrices per block), each route against the first one in the same run:
  eigh float64 per layer      what `projected_top` does now (T-batch per call)
  eigh float64 one batch      every layer's Gram in one call
  eigh float32 one batch
  eigvalsh float64 one batch  values only (the spectrum plot's need)
  svd drivers                 torch.linalg.svd(driver=…) on CUDA
  subspace iteration          matmul-only top-k (`analysis.svd.top_k_eigh`), with its error

    python benchmarks/topk_solvers.py --device cuda --blocks 12
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import get_device  # noqa: E402

SHAPES = {"qkv": (2304, 768), "out": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}   # benchmarks/merge.py's
MINILM = {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384), "fc1": (1536, 384), "fc2": (384, 1536)}


def grams(n_tasks: int, blocks: int, device, common_fraction: float = 0.8, seed: int = 0, shapes=SHAPES):
    """Projected-residual Gram matrices BᵀB (768 × 768) of every square-ish matrix, as Iso-CTS forms them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(blocks):
        for m, n in shapes.values():
            r = min(m, n)
            decay = 1.0 / (1.0 + torch.arange(r) / 32.0)
            taus = torch.stack([(torch.randn(m, r, generator=g) * decay) @ torch.randn(r, n, generator=g) / n
                                for _ in range(n_tasks)]).to(device)
            total = taus.sum(0)
            u = torch.linalg.svd(total.double(), full_matrices=False)[0].float()
            common = int(common_fraction * r)
            x = taus if m >= n else taus.mT
            uc = u[:, :common] if m >= n else torch.linalg.svd(total.mT.double(), full_matrices=False)[0].float()[:, :common]
            b = x - uc @ (uc.mT @ x)
            out.append((b.mT @ b).double())
    return torch.cat(out)        # (blocks·4·T, 768, 768)


def timed(fn, device, repeat):
    times, out = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=19, help="top directions wanted (Iso-CTS at c=0.8, T=8, r=768: 19)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--shape", choices=["vit", "minilm"], default="vit",
                    help="vit: 768-wide Grams (Iso-CTS on ViT-B/32); minilm: 384-wide (the quick demo's spectra)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU pool size for the CPU eigh route")
    ap.add_argument("--drivers", default="gesvdj,gesvda", help="CUDA svd drivers to time ('' for none)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = get_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    g = grams(args.tasks, args.blocks, device, shapes=SHAPES if args.shape == "vit" else MINILM)
    print(f"device {device}, torch {torch.__version__}; {g.shape[0]} Gram matrices {tuple(g.shape[1:])} "
          f"built in {time.perf_counter() - t0:.1f} s; k = {args.k}")
    T, k = args.tasks, args.k
    ref_vals, ref_vecs = torch.linalg.eigh(g)
    ref_top = ref_vecs.flip(-1)[..., :k]
    rows = []

    def add(name, fn, err_fn=None):
        try:
            out, sec = timed(fn, device, args.repeat)
            err = err_fn(out) if err_fn else float("nan")
            rows.append((name, sec, err))
            print(f"{name}: {sec:.4f} s, err {err:.1e}", flush=True)
        except Exception as exc:   # a driver that does not exist here
            rows.append((name, float("nan"), float("nan")))
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    def subspace_err(vecs):
        # distance between the top-k subspaces: ‖Q Qᵀ − R Rᵀ‖_F / √(2k)
        q = vecs[..., :k].double()
        return float(((q @ q.mT - ref_top @ ref_top.mT).norm(dim=(-2, -1)) / (2 * k) ** 0.5).max())

    add("eigh float64, per layer (T per call)", lambda: [torch.linalg.eigh(g[i:i + T]) for i in range(0, g.shape[0], T)])
    add("eigh float64, one batch", lambda: torch.linalg.eigh(g))
    add("eigh float32, one batch", lambda: torch.linalg.eigh(g.float()),
        lambda o: subspace_err(o[1].flip(-1)))
    add("eigvalsh float64, one batch", lambda: torch.linalg.eigvalsh(g))
    add("eigvalsh float32, one batch", lambda: torch.linalg.eigvalsh(g.float()))
    def cpu_pool(threads: int):
        # the batch to the host, split over a pool of one-thread LAPACK calls, back to the device
        from concurrent.futures import ThreadPoolExecutor
        host = g.cpu()
        chunks = host.chunk(threads)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(torch.linalg.eigh, chunks))
        finally:
            torch.set_num_threads(before)
        return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)

    add(f"eigh float64 on the CPU, {args.threads} one-thread calls", lambda: cpu_pool(args.threads),
        lambda o: subspace_err(o[1].flip(-1)))
    try:
        from analysis.svd import top_k_eigh
    except ImportError:
        top_k_eigh = None
    if top_k_eigh is not None:
        add(f"top_k_eigh float64 k={k}", lambda: top_k_eigh(g, k), lambda o: subspace_err(o[1]))
        add(f"top_k_eigh float32 k={k}", lambda: top_k_eigh(g.float(), k), lambda o: subspace_err(o[1]))
    x = g.float()   # symmetric PSD: its SVD is its eigendecomposition, same sizes as the residuals' SVDs
    for driver in [d for d in args.drivers.split(",") if d] if device.type == "cuda" else []:
        add(f"svd float32 driver={driver}", lambda d=driver: torch.linalg.svd(x, full_matrices=False, driver=d),
            lambda o: subspace_err(o[2].mT))
    base = rows[0][1]
    print()
    print(f"| route | median s ({args.repeat} runs) | route / per-layer eigh | top-{k} subspace error |")
    print("|---|---|---|---|")
    for name, sec, err in rows:
        print(f"| {name} | {sec:.4f} | {sec / base:.2f}× | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
