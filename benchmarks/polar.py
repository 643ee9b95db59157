"""Polar-factor solvers on TSV-M's inputs: time and error against the exact SVD route.

The inputs are what a TSV-M re-merge after a rank change orthogonalises: for
each matrix of a ViT-B/32-shaped block (2304×768, 768×768, 3072×768,
768×3072), the concatenated top-q left singular vectors U = [U_1 … U_T] of T
tasks with decaying spectra, q = ⌊r/T⌋ (TSV-M's default rank fraction 1/T,
i.e. square and ill-conditioned), batched by shape as tsv.py batches them.

For each solver (exact SVD, float64 Gram eigh, Newton–Schulz in IEEE float32
and with 3xTF32 tensor-core products) it prints the median wall time over
--repeat runs, the ratio to the exact route measured in the same run, the
max relative Frobenius error against the exact polar factor, and the steps
and fallbacks of Newton–Schulz. On a CPU, "tf32x3" runs plain float32
products (CPUs have no TF32), so only its error is meaningful there.

    python benchmarks/polar.py --blocks 1                 # CPU, small
    python benchmarks/polar.py --device cuda --blocks 12  # one GPU: the ViT-12 TSV-M polar work
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info, get_device  # noqa: E402
from analysis.merging.polar import polar_exact, polar_gram, polar_newton_schulz  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def tsv_inputs(blocks: int, tasks: int, device, seed: int = 0) -> list[torch.Tensor]:
    """One (blocks, m, T·q) batch of concatenated task bases per shape."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in SHAPES:
        r = min(m, n)
        q = max(1, r // tasks)
        batch = []
        for _ in range(blocks):
            parts = []
            for _ in range(tasks):
                a = torch.randn(m, r, generator=g) / math.sqrt(m) * (1.0 / (1.0 + torch.arange(r) / 32.0))
                c = torch.randn(r, n, generator=g) / math.sqrt(n)
                u, _, _ = torch.linalg.svd(a.to(device) @ c.to(device), full_matrices=False)
                parts.append(u[:, :q])
            batch.append(torch.cat(parts, 1))
        out.append(torch.stack(batch))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = get_device(args.device)
    info = device_info(device)
    print(f"device: {info['name']} ({device}), torch {info['torch']}, threads {info['cpu_threads']}")
    t0 = time.perf_counter()
    inputs = tsv_inputs(args.blocks, args.tasks, device)
    print(f"inputs: {args.blocks} block(s), T={args.tasks}: " + ", ".join(f"{tuple(x.shape)}" for x in inputs)
          + f" (built in {time.perf_counter() - t0:.1f} s)")
    exact = [polar_exact(x) for x in inputs]
    solvers = {"exact (SVD)": lambda x: (polar_exact(x), {}),
               "gram (float64 eigh)": lambda x: polar_gram(x, return_info=True),
               "newton_schulz float32": lambda x: polar_newton_schulz(x, precision="float32", return_info=True),
               "newton_schulz tf32x3": lambda x: polar_newton_schulz(x, precision="tf32x3", return_info=True)}
    rows = []
    for label, fn in solvers.items():
        fn(inputs[1][:1])                      # warm-up (kernels, cuBLAS handles)
        times, err, steps, fallbacks = [], 0.0, [], 0
        for _ in range(args.repeat):
            sync(device)
            t = time.perf_counter()
            outs = [fn(x) for x in inputs]
            sync(device)
            times.append(time.perf_counter() - t)
        for (w, extra), ref in zip(outs, exact):
            num = torch.linalg.matrix_norm((w - ref).double())
            err = max(err, float((num / torch.linalg.matrix_norm(ref.double())).max()))
            steps.append(extra.get("steps"))
            fallbacks += int(extra.get("fallback", 0))
        rows.append({"solver": label, "median_s": statistics.median(times), "times_s": times, "max_rel_error": err,
                     "steps": steps, "fallbacks": fallbacks})
    base = rows[0]["median_s"]
    print("\n| solver | median s | exact / solver | max rel. error vs exact | NS steps per shape | fallbacks |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        steps = ", ".join(str(s) for s in r["steps"]) if r["steps"][0] is not None else "–"
        print(f"| {r['solver']} | {r['median_s']:.4f} | {base / r['median_s']:.2f}× | {r['max_rel_error']:.1e} | "
              f"{steps} | {r['fallbacks']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
