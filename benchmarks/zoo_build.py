"""Measure a built benchmark: per-task test accuracy of the zero-shot probe, the
fine-tuned model, and Task Arithmetic (sum of task vectors x alpha), plus each
MNIST MLP's test accuracy and the build's recorded time.

    python benchmarks/zoo_build.py [--quick | --full] [--cache-dir D] [--alpha 0.3] [--json out.json]

Prints markdown tables; every number is measured here (or read from what the
build itself measured: reference table, manifest, MLP metadata).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.zoo import load_demo  # noqa: E402
from analysis.zoo.mnist import accuracy, load_dataset, load_mlp, mlp_metadata  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--full", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    quick = True if args.quick else False if args.full else None

    demo = load_demo(args.cache_dir, quick=quick)
    m = demo.manifest
    print(f"build: {demo.root} ({m['kind']}), device {m['device']}, recorded build time {m['build_seconds']} s, "
          f"finished {m['finished']}")
    ref = demo.reference_accuracy("test")

    t0 = time.time()
    ta_delta = demo.tvs.sum()
    ta = demo.evaluator.evaluate_delta(ta_delta, alpha=args.alpha, split="test")
    ta_acc = ta[ta.metric == "accuracy"].set_index("task")["value"]
    n = ta[ta.metric == "accuracy"].set_index("task")["n"]
    t_eval = time.time() - t0

    rows = []
    print(f"\n| task | n test | zero-shot (probe) | fine-tuned | task arithmetic (sum x {args.alpha}) |")
    print("|---|---|---|---|---|")
    for task in demo.tasks:
        r = {"task": task, "n_test": int(n[task]), "zero_shot": float(ref.loc[task, "zero_shot"]),
             "fine_tuned": float(ref.loc[task, "fine_tuned"]), "task_arithmetic": float(ta_acc[task])}
        rows.append(r)
        print(f"| {task} | {r['n_test']} | {r['zero_shot']:.3f} | {r['fine_tuned']:.3f} | {r['task_arithmetic']:.3f} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("zero_shot", "fine_tuned", "task_arithmetic")}
    print(f"| **mean** | | {mean['zero_shot']:.3f} | {mean['fine_tuned']:.3f} | {mean['task_arithmetic']:.3f} |")
    better = sum(r["fine_tuned"] > r["zero_shot"] for r in rows)
    print(f"\nfine-tuned > probe on {better} of {len(rows)} tasks; TA evaluation took {t_eval:.1f} s")

    mlps = []
    if demo.mnist_paths:
        x, y = load_dataset(demo.mnist_dataset, "test")
        print(f"\n| MLP ({demo.mnist_dataset}) | seed | test accuracy | test loss | recorded at build |")
        print("|---|---|---|---|---|")
        for p in demo.mnist_paths:
            meta = mlp_metadata(p)
            acc, loss = accuracy(load_mlp(p), x, y)
            mlps.append({"path": str(p), "seed": meta.get("seed"), "test_accuracy": acc, "test_loss": loss})
            print(f"| {p.name} | {meta.get('seed')} | {acc:.4f} | {loss:.4f} | {meta.get('test_accuracy', float('nan')):.4f} |")

    per_task_time = {t: demo.cards[t].get("build_seconds") for t in demo.tasks}
    print(f"\nper-task build seconds (wall, as recorded): {per_task_time}")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(demo.root), "manifest": m, "alpha": args.alpha,
                                               "tasks": rows, "mean": mean, "mlps": mlps,
                                               "per_task_build_seconds": per_task_time}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
