"""The floor of an Iso-CTS common-fraction move on this machine: its unavoidable eigendecompositions, against
the whole re-merge measured in the same run.

A move from c to c' needs, exactly and in float64 (analysis/merging/iso.py), per matrix parameter of shape
m × n (r = min(m, n); common, s = split_rank(r, T, c')):
- tall (m > n): the top s eigenpairs of each task's r × r Gram of its residual outside the common subspace;
- square and wide: the top s of each task's (r − common)² row Gram;
- the polar factor of V* (n × r): one r × r Gram eigh; and of X (m × T·s): one (T·s)² eigh.
This times exactly those, with the routines the merge uses (`top_eigh_exact`: MRRR where it pays;
`batched_eigh`: two one-thread workers on a 2-core CPU), on random SPD matrices of the set's sizes. It also
times three products no route of the present arithmetic avoids, at their cheapest: the final dense U⊥V⊥ᵀ
(m × r by r × n, float32), one float32 application of V*'s (·)^(−1/2) (min(m, n) × r by r × r) and, for
tall matrices, each task's float64 Gram of its r − common residual rows (r × r); eighs plus these are the
"floor" column. Then it
times the real re-merge (`merge(inputs, "iso_cts", common_fraction=c')` after an untimed one at 0.8) on the
same set. The ratios say how much of a move is decompositions, and eighs plus those products, that no exact
route avoids; the other products, the first estimate's scoring and the page come on top.

    python benchmarks/iso_cts_floor.py                          # the quick demo (built), c = 0.7, 0.5, 0.3
    python benchmarks/iso_cts_floor.py --set vit --blocks 2 --c 0.7,0.9,0.6   # ViT-B/32-shaped blocks, T = 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from analysis.merging import merge  # noqa: E402
from analysis.merging.common import decomposed  # noqa: E402
from analysis.merging.inputs import MergeInputs  # noqa: E402
from analysis.merging.iso import split_rank  # noqa: E402
from analysis.svd import batched_eigh, top_eigh_exact  # noqa: E402


def load(which: str, blocks: int):
    if which == "vit":
        from merge import synthetic_set
        tvs = synthetic_set(8, blocks)
    else:
        from analysis.taskvectors import TaskVectorSet
        from analysis.zoo import find_build
        folder = find_build(None, quick=True)
        tasks = json.loads((folder / "manifest.json").read_text())["tasks"]
        tvs = TaskVectorSet.from_checkpoints(folder / "pretrained",
                                             {t: folder / "tasks" / t / "finetuned" for t in tasks})
    tvs.keep_resident()
    return tvs


def spd(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(count, n, n + 8, dtype=torch.float64, generator=gen)
    return a @ a.mT


def timed(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def eigh_floor(shapes: Counter, n_tasks: int, c: float, repeat: int, gen) -> dict:
    """Seconds of each part's eighs for one move to `c` (shapes: Counter of (m, n) matrix views)."""
    parts = Counter()
    for (m, n), count in shapes.items():
        r = min(m, n)
        common, s = split_rank(r, n_tasks, c)
        if s == 0:
            continue
        # the matrices are made first: only the decompositions are timed
        grams = spd(count * n_tasks, r if m > n else r - common, gen)
        parts["tall top-s" if m > n else "rows top-s"] += timed(lambda: top_eigh_exact(grams, s), repeat)
        v_star, x = spd(count, r, gen), spd(count, n_tasks * s, gen)
        parts["V* polar"] += timed(lambda: batched_eigh(v_star), repeat)
        parts["X polar"] += timed(lambda: batched_eigh(x), repeat)
    return dict(parts)


def product_floor(shapes: Counter, n_tasks: int, c: float, repeat: int, gen) -> dict:
    """Seconds of the products every move needs at least (module doc), for one move to `c`."""
    parts = Counter()
    for (m, n), count in shapes.items():
        r = min(m, n)
        common, s = split_rank(r, n_tasks, c)
        u, vh = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
        side, root = torch.randn(r, r, generator=gen), torch.randn(min(m, n), r, generator=gen)
        parts["final product"] += count * timed(lambda: u @ vh, repeat)
        parts["V* apply"] += count * timed(lambda: root @ side, repeat)
        if m > n and s > 0:
            rows = torch.randn(n_tasks, r - common, n, dtype=torch.float64, generator=gen)
            parts["tall Grams"] += count * timed(lambda: rows.mT @ rows, repeat)
    return dict(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["quick", "vit"], default="quick")
    ap.add_argument("--blocks", type=int, default=2, help="ViT blocks (--set vit)")
    ap.add_argument("--c", default="0.7,0.5,0.3", help="common fractions moved to, from 0.8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}", flush=True)
    tvs = load(args.set, args.blocks)
    names = decomposed(tvs, {})
    shapes = Counter((tvs.shape(n)[0], int(torch.Size(tvs.shape(n)[1:]).numel())) for n in names)
    n_tasks = len(tvs.tasks)
    print(f"set {args.set}: {len(names)} matrices {dict(shapes)}, T = {n_tasks}", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c in (float(v) for v in args.c.split(",")):
        floor = eigh_floor(shapes, n_tasks, c, args.repeat, gen)
        products = product_floor(shapes, n_tasks, c, args.repeat, gen)
        times = []
        for _ in range(args.repeat):
            inputs = MergeInputs(tvs)                       # a fresh memo: every move re-merges
            merge(inputs, "iso_cts", common_fraction=0.8)   # the view before the move (factors once, untimed)
            t0 = time.perf_counter()
            merge(inputs, "iso_cts", common_fraction=c)
            times.append(time.perf_counter() - t0)
        rows.append((c, floor, products, statistics.median(times), times))
        print(f"c={c}: eighs {sum(floor.values()):.3f} s {({k: round(v, 3) for k, v in floor.items()})}; "
              f"products {sum(products.values()):.3f} s {({k: round(v, 3) for k, v in products.items()})}; "
              f"re-merge {statistics.median(times):.3f} s", flush=True)
    print(f"\nload average after {os.getloadavg()}\n")
    print("| c | tall top-s s | rows top-s s | V* polar s | X polar s | eighs s | products s | floor s | "
          "re-merge s (median; runs) | eighs / re-merge | floor / re-merge |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c, floor, products, med, times in rows:
        total, least = sum(floor.values()), sum(floor.values()) + sum(products.values())
        print(f"| {c} | " + " | ".join(f"{floor.get(k, 0.0):.3f}" for k in ("tall top-s", "rows top-s", "V* polar",
                                                                              "X polar"))
              + f" | {total:.3f} | {sum(products.values()):.3f} | {least:.3f} | {med:.3f} "
                f"({', '.join(f'{t:.3f}' for t in times)}) | {total / med:.2f} | {least / med:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
