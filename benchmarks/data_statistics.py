"""Time the data statistics and the data-aware merges on a demo build.

    python benchmarks/data_statistics.py --build quick [--device cuda] [--n 256]

Prints the seconds to compute every task's diagonal Fisher and linear-input
Grams (n training examples per task), then to load them again from the disk
cache (the baseline a second session pays), and one merge of each data-aware
method at its defaults. Ratios are against the cached load measured in the
same run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", choices=["quick", "full", "tiny"], default="quick")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args(argv)

    import torch
    from analysis.device import device_info
    from analysis.merging import MergeInputs, merge
    from analysis.zoo import build_tiny_demo, load_demo
    if args.build == "tiny":
        demo = build_tiny_demo(Path(tempfile.mkdtemp()), device=args.device)
    else:
        demo = load_demo(args.cache_dir, quick=args.build == "quick", device=args.device)
    info = device_info(demo.evaluator.device)
    print(f"device: {info['name']} ({info['device']}), torch {info['torch']}; demo {demo.root.name}, "
          f"T={len(demo.tasks)}, n={args.n} examples per task")
    stats_dir = Path(tempfile.mkdtemp(prefix="ms-stats-"))

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    rows = []
    fresh = MergeInputs(demo.tvs, demo.evaluator, cache_dir=stats_dir)
    for label, fn in (("diagonal Fisher", lambda i: i.fisher(n=args.n)),
                      ("linear-input Grams", lambda i: i.activation_grams(n=args.n))):
        t0 = time.perf_counter(); fn(fresh); sync(); computed = time.perf_counter() - t0
        again = MergeInputs(demo.tvs, demo.evaluator, cache_dir=stats_dir)
        t0 = time.perf_counter(); fn(again); loaded = time.perf_counter() - t0
        rows.append((label, computed, loaded))
    print("| statistic | computed s | loaded from the disk cache s | computed / loaded |")
    print("|---|---|---|---|")
    for label, c, l in rows:
        print(f"| {label} | {c:.1f} | {l:.2f} | {c / l:.0f}× |")
    print("\n| merge (defaults, statistics cached) | first s | second s |")
    print("|---|---|---|")
    for name in ("fisher", "regmean", "regmean_pp", "epimer"):
        times = []
        for _ in range(2):
            t0 = time.perf_counter(); merge(fresh, name); sync(); times.append(time.perf_counter() - t0)
        print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
