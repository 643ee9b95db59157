"""Re-merge time per knob move on the built demo, this checkout against an earlier commit in the same run.

What the Merge page's `merged_delta` does on a slider move, without the page: one `merge(inputs, method, knob=v)`
on a resident demo set with its SpectralCache warm (factors from disk, or computed once before the clock), for
a sequence of knob values; each value is new, so each move re-merges. The moves run in a thread of their own,
as a page's script does, and each also reports the process's minor page faults (fresh memory touched) and
system CPU time. `--code-rev REV` runs the same moves on
REV's engine (a temporary git worktree, in a child process) before this checkout's, interleaved per method.

    python benchmarks/remerge_moves.py --code-rev b2bb2cc
    python benchmarks/remerge_moves.py --method tsv_m:rank_fraction:0.125,0.12,0.115,0.11
    python benchmarks/remerge_moves.py --code-rev HEAD --beside-scoring     # while a refinement scores
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["tsv_m:rank_fraction:0.125,0.12,0.115,0.11,0.105", "tsv_m:rank_fraction:0.125,0.13,0.135,0.14",
           "iso_cts:common_fraction:0.8,0.79,0.78,0.77,0.76"]


def child(root: str, moves: list[str], quick: bool, beside_scoring: bool = False) -> dict:
    """Runs in a process whose sys.path starts at `root`: times each move of each method (with
    `beside_scoring`, while another thread scores the base model on 8 examples of one task over and
    over, as a page's background refinement does)."""
    sys.path.insert(0, root)
    import threading

    import torch  # noqa: F401

    from analysis.merging import merge
    from analysis.merging.inputs import MergeInputs
    from analysis.taskvectors import TaskVectorSet
    from analysis.zoo import find_build
    folder = find_build(None, quick=quick)
    tasks = json.loads((folder / "manifest.json").read_text())["tasks"]
    tvs = TaskVectorSet.from_checkpoints(folder / "pretrained", {t: folder / "tasks" / t / "finetuned" for t in tasks})
    tvs.keep_resident()
    out = {"build": folder.name, "moves": {}}
    stop = threading.Event()
    if beside_scoring:
        from analysis.zoo import load_demo
        ev = load_demo(None, quick=quick).evaluator

        def score():
            while not stop.is_set():
                ev.evaluate(None, subsample=8, tasks=[ev.tasks[0]])
        scorer = threading.Thread(target=score, daemon=True)
        scorer.start()
        time.sleep(3)
    out["faults"], out["system_s"] = {}, {}

    def run_moves():
        for spec in moves:
            method, knob, values = spec.split(":")
            vals = [float(v) for v in values.split(",")]
            inputs = MergeInputs(tvs)            # a fresh page session: memos empty, factors from the disk cache
            merge(inputs, method, **{knob: vals[0]})   # the page's first render (not timed)
            times, faults, system = [], [], []
            for v in vals[1:]:
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                merge(inputs, method, **{knob: v})
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                times.append(round(time.perf_counter() - t0, 3))
                faults.append(r1.ru_minflt - r0.ru_minflt)     # fresh memory touched (4 KiB pages)
                system.append(round(r1.ru_stime - r0.ru_stime, 3))
            out["moves"][spec], out["faults"][spec], out["system_s"][spec] = times, faults, system
    mover = threading.Thread(target=run_moves)   # in a thread of its own, as Streamlit runs a page's script
    mover.start()
    mover.join()
    stop.set()
    if beside_scoring:
        scorer.join()   # a thread still inside torch at exit aborts the process
    return out


def run_child(root: Path, moves: list[str], quick: bool, beside_scoring: bool) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import remerge_moves as r; "
            f"print(json.dumps(r.child({str(root)!r}, {moves!r}, {quick!r}, {beside_scoring!r})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"the run on {root} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", default=None,
                    help="method:knob:v0,v1,... (v0 is the untimed first render); repeatable")
    ap.add_argument("--code-rev", default=None, help="also run REV's engine (a git worktree) as the baseline")
    ap.add_argument("--full", action="store_true", help="the full demo build (default: quick)")
    ap.add_argument("--beside-scoring", action="store_true",
                    help="time the moves while another thread scores forward passes (a background refinement)")
    args = ap.parse_args()
    moves = args.method or DEFAULT
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ms-remerge-") as tmp:
        if args.code_rev:
            wt = Path(tmp) / "code"
            subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.code_rev], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                results["before"] = run_child(wt, moves, not args.full, args.beside_scoring)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
        results["now"] = run_child(ROOT, moves, not args.full, args.beside_scoring)
    print(f"demo build {results['now']['build']}; load average after {os.getloadavg()}\n")
    print("| method: knob moves | now s (median; runs) | now: minor faults, system CPU s (medians) | "
          + ("before s (median; runs) | before: minor faults, system CPU s (medians) | now / before |"
             if "before" in results else ""))
    print("|---|---|---|" + ("---|---|---|" if "before" in results else ""))

    def cells(r: dict, spec: str) -> str:
        t = r["moves"][spec]
        return (f" {statistics.median(t):.3f} ({', '.join(f'{x:.3f}' for x in t)}) | "
                f"{statistics.median(r['faults'][spec]):.0f}, {statistics.median(r['system_s'][spec]):.2f} |")
    for spec in moves:
        row = f"| {spec} |" + cells(results["now"], spec)
        if "before" in results:
            now, before = (statistics.median(results[k]["moves"][spec]) for k in ("now", "before"))
            row += cells(results["before"], spec) + f" {now / before:.2f}× |"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
