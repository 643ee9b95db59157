"""Diagnostic: does a merge depend on torch's thread count? (Why llm_scale's single path, torch with N
threads, and its Ray path, one thread per task, can write merged weights that differ in the last bits.)

    python benchmarks/merge_threads.py                       # TSV-M on LLaMA-0.5B-shaped matrices, 1 vs 2 threads
    python benchmarks/merge_threads.py --method iso_c --threads 1 4

Builds a random set in memory (base + T tasks, a 1536² and a 4096×1536 matrix), merges it in this process
with each thread count, and prints per tensor: bit-identical or not, max |Δ| relative to the merged
tensor's max magnitude, and the share of bf16 weights (base + delta, as the benchmark writes them) that differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.merging import merge  # noqa: E402
from analysis.merging.inputs import MergeInputs  # noqa: E402
from analysis.taskvectors import TaskVectorSet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="tsv_m")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs=2, default=(1, 2))
    ap.add_argument("--rank-fraction", type=float, default=0.25)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    base = {"attn (1536×1536)": torch.randn(1536, 1536, generator=g),
            "mlp (4096×1536)": torch.randn(4096, 1536, generator=g)}
    tasks = {f"task{t}": {k: b + 0.01 * torch.randn(b.shape, generator=g) for k, b in base.items()}
             for t in range(args.tasks)}
    tvs = TaskVectorSet.from_state_dicts(base, tasks)
    knobs = {"rank_fraction": args.rank_fraction} if args.method in ("tsv_m", "iso_cts") else {}
    out = {}
    for n in args.threads:
        torch.set_num_threads(n)
        result = merge(MergeInputs(tvs), args.method, **knobs)
        out[n] = {k: result[k].clone() for k in base}
    a, b = args.threads
    print(f"{args.method}, T = {args.tasks}, torch threads {a} vs {b}:")
    for k in base:
        x, y = out[a][k], out[b][k]
        rel = float((x - y).abs().max()) / float(x.abs().max())
        flips = float((base[k] + x).bfloat16().ne((base[k] + y).bfloat16()).float().mean())
        print(f"  {k}: {'identical' if torch.equal(x, y) else 'different'}; max |Δ| / max |merged| {rel:.1e}; "
              f"bf16 weights differing {100 * flips:.4f} %")


if __name__ == "__main__":
    main()
