"""Top-k eigenpairs of batches of float64 Grams on a CPU: MRRR one matrix at a time through
scipy.linalg.eigh (the route before; it holds the GIL), MRRR over `batched_eigh`'s worker threads through
the GIL-free binding (`analysis.svd._top_eigh_mrrr` now), and a full `batched_eigh`, in one run. The
sizes are the Iso-CTS Grams of the quick demo (384) and of ViT-B/32 (768); `_mrrr_pays` reads its
crossover from these figures.

    python benchmarks/mrrr_threads.py                 # 16 matrices per size, medians of 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.svd import _top_eigh_mrrr, batched_eigh  # noqa: E402


def one_at_a_time(g: torch.Tensor, k: int) -> None:
    import scipy.linalg
    n = g.shape[-1]
    for a in g.numpy():
        scipy.linalg.eigh(a, subset_by_index=(n - k, n - 1), driver="evr")


def median_ms(fn, count: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=16, help="matrices per batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="256:7,25,43;384:11,38,64;768:23,77,128,192",
                    help="n:k,k,…;… (n the Gram's size, k the eigenpairs wanted)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per matrix, medians of {args.repeat}")
    print("| n | k | scipy one at a time (before) | MRRR over the workers (now) | now / before | full batched_eigh |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for spec in args.sizes.split(";"):
        n, ks = spec.split(":")
        n = int(n)
        a = torch.randn(args.count, n, n + 8, dtype=torch.float64, generator=gen)
        g = a @ a.mT
        _top_eigh_mrrr(g[:2], 2)                      # start the worker pool outside the timings
        full = median_ms(lambda: batched_eigh(g), args.count, args.repeat)
        for k in map(int, ks.split(",")):
            before = median_ms(lambda: one_at_a_time(g, k), args.count, args.repeat)
            now = median_ms(lambda: _top_eigh_mrrr(g, k), args.count, args.repeat)
            print(f"| {n} | {k} | {before:.1f} | {now:.1f} | {now / before:.2f} | {full:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
