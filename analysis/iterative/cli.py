"""`python -m analysis.zoo atm|cold-fusion [--quick|--full|--tiny] ...` on a built demo."""
from __future__ import annotations

import argparse
import json
import sys
import time

from analysis.errors import MergescopeError


def add_parsers(sub) -> None:
    for name, procedure in (("atm", "atm"), ("cold-fusion", "cold_fusion")):
        p = sub.add_parser(name, help=f"{'ATM' if procedure == 'atm' else 'ColD Fusion'} on the built demo, "
                                      "round by round (cached, resumable)")
        p.set_defaults(procedure=procedure, handler=main)
        which = p.add_mutually_exclusive_group()
        which.add_argument("--quick", action="store_true", help="the quick demo and the quick preset (3 rounds)")
        which.add_argument("--full", action="store_true", help="the full demo and the full preset (5 rounds)")
        which.add_argument("--tiny", action="store_true", help="the tiny test demo (2 rounds)")
        p.add_argument("--cache-dir", default=None, help="cache folder holding the demo (and the run)")
        p.add_argument("--rounds", type=int, help="number of rounds R (the budget per task stays the build's)")
        p.add_argument("--steps", type=int, help="total fine-tuning steps per task over all rounds")
        p.add_argument("--method", help="registry merging method (default: task_arithmetic for ATM, "
                                        "weight_averaging for ColD Fusion)")
        p.add_argument("--knobs", default="{}", help='merge knobs as JSON, e.g. \'{"alpha": 0.5}\'')
        p.add_argument("--tasks", help="comma-separated tasks to fine-tune / fuse (default: all but the held-out)")
        if procedure == "cold_fusion":
            p.add_argument("--heldout", help="comma-separated held-out tasks (default: the last two)")
            p.add_argument("--heldout-steps", type=int, help="steps of the short fine-tune on each held-out task")
        p.add_argument("--subsample", type=int, help="examples per task scored each round (default: all)")
        p.add_argument("--csv", help="write the tidy per-round table here")


def config_for(args, demo):
    from analysis.iterative import preset
    name = "tiny" if args.tiny else "full" if args.full else "quick"
    heldout = []
    if args.procedure == "cold_fusion":
        heldout = args.heldout.split(",") if args.heldout else demo.tasks[-2:]
    tasks = args.tasks.split(",") if args.tasks else [t for t in demo.tasks if t not in heldout]
    overrides = {"merge_knobs": json.loads(args.knobs)}
    for field, value in (("rounds", args.rounds), ("total_steps", args.steps), ("merge_method", args.method),
                         ("eval_subsample", args.subsample),
                         ("heldout_steps", getattr(args, "heldout_steps", None))):
        if value is not None:
            overrides[field] = value
    if args.steps is not None:
        overrides["task_total_steps"] = ()
    sizes = {t: demo.evaluator.split_size(t, "train") for t in demo.tasks}
    return preset(name, args.procedure, tasks, demo.manifest["config"], sizes, heldout=heldout, **overrides)


def main(args) -> int:
    from analysis.iterative import run
    from analysis.zoo import load_demo
    t0 = time.time()

    def progress(fraction: float, message: str) -> None:
        print(f"[{time.time() - t0:7.1f} s {100 * fraction:5.1f}%] {message}", flush=True)

    try:
        if args.tiny:   # seconds to build; built here when missing
            from analysis.zoo import build_tiny_demo, default_cache_dir
            demo = build_tiny_demo(default_cache_dir(args.cache_dir))
        else:
            demo = load_demo(args.cache_dir, quick=not args.full)
        config = config_for(args, demo)
        result = run(config, demo.evaluator, args.cache_dir, progress=progress)
    except (MergescopeError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    wide = result.table[result.table["metric"].isin(["mean_accuracy", "cosine", "update_norm",
                                                     "heldout_probe_accuracy", "heldout_finetune_accuracy"])]
    wide = wide[wide["task"].isin(["mean", "all"])].pivot_table(index="round", columns="metric", values="value")
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    if args.csv:
        result.table.to_csv(args.csv, index=False)
    print(result.folder)
    return 0
