"""Merge time of CART, WUDI, KnOTS and EMR against Task Arithmetic and TIES
(measured in the same run), and how far the paper's WUDI procedure (300 Adam
steps at lr 1e-5 from the sum) gets towards the exact minimiser.

Synthetic set shaped like CLIP ViT-B/32's vision tower (`benchmarks/merge.py`'s
`synthetic_set`: T tasks, `--blocks` blocks of qkv 2304×768, out 768×768,
fc1 3072×768, fc2 768×3072 plus biases, random deltas with a decaying
spectrum). Each method is merged `--repeat` times on a fresh MergeInputs
(nothing memoised between repeats; the median is printed) and once more on
the same inputs with a changed knob (what a slider move costs).

    python benchmarks/parity_b.py --blocks 1 --tasks 8 --repeat 3
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info  # noqa: E402
from analysis.merging import MergeInputs, merge  # noqa: E402
from analysis.merging.wudi import wudi_adam, wudi_closed_form, wudi_loss  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).resolve().parent / "merge.py")
_bench_merge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_merge)
synthetic_set = _bench_merge.synthetic_set

RUNS = [  # (label, method, knobs, changed knobs for the re-merge)
    ("task_arithmetic", "task_arithmetic", {}, {"alpha": 0.5}),
    ("ties", "ties", {}, {"alpha": 0.8}),
    ("cart", "cart", {}, {"lam": 1.0}),
    ("wudi (closed form)", "wudi", {}, {"alpha": 2.0}),
    ("knots (ties inside)", "knots", {}, {"density": 0.3}),
    ("emr", "emr", {}, {"rescaler": "tensor_means"}),
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = device_info()
    print(f"device {info['name']} ({info['device']}), torch {info['torch']}, {torch.get_num_threads()} threads; "
          f"{args.tasks} tasks, {args.blocks} ViT-B/32-shaped block(s), median of {args.repeat}")
    tvs = synthetic_set(args.tasks, args.blocks)
    tvs.keep_resident("cpu")
    for name in tvs.param_names:   # read every delta once, so no method's time includes building the set
        tvs.deltas(name)
    times = {}
    for label, method, knobs, changed in RUNS:
        runs = []
        for _ in range(args.repeat):
            inputs = MergeInputs(tvs, device="cpu", persist=False)
            runs.append(timed(lambda: merge(inputs, method, **knobs))[0])
        again, _ = timed(lambda: merge(inputs, method, **{**knobs, **changed}))
        times[label] = sorted(runs)[len(runs) // 2]
        knob = ", ".join(f"{k}={v}" for k, v in changed.items())
        print(f"{label:22s} {times[label]:8.2f} s  ({times[label] / times['task_arithmetic']:6.1f}× TA)   "
              f"re-merge after {knob}: {again:.2f} s")

    # the paper's WUDI procedure on one 3072×768 (fc1) and one 768×3072 (fc2) layer
    for name in [n for n in tvs.param_names if n.endswith("c_fc.weight") or n.endswith("c_proj.weight")][:2]:
        taus = tvs.deltas(name)
        t_exact, exact = timed(lambda: wudi_closed_form(taus))
        t_adam, adam = timed(lambda: wudi_adam(taus, 300, 1e-5))
        start = taus.sum(0)
        loss = {k: float(wudi_loss(v, taus)) for k, v in (("sum", start), ("adam", adam), ("exact", exact))}
        moved = float((adam - start).norm() / (exact - start).norm())
        print(f"WUDI {name.split('.', 3)[-1]} {tuple(taus.shape[1:])}: closed form {t_exact:.2f} s, "
              f"300 Adam steps {t_adam:.2f} s ({t_adam / t_exact:.1f}×); loss at the sum {loss['sum']:.4g}, "
              f"after Adam {loss['adam']:.4g}, minimum {loss['exact']:.4g}; Adam covered {moved:.1%} of the "
              f"distance from the sum to the minimiser")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
