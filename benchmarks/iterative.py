"""ATM and ColD Fusion on the built-in demo -> docs/results_iterative.md (+ PNG curves in docs/).

- ATM for R rounds (the preset's) against one-shot task arithmetic, TSV-M and
  Iso-C (registry defaults) on the build's own task vectors: every task gets
  the same total number of fine-tuning steps either way (ATM splits the
  build's budget over its rounds).
- ColD Fusion on all tasks but the held-out ones: multi-task accuracy of the
  fused model per round, and the held-out tasks' linear-probe and short
  fine-tune accuracy per round against the original backbone (round 0).
- Wall and CPU time of each round, as measured when the round ran (runs are
  cached by content: a second invocation reads them back and says so).

    python benchmarks/iterative.py [--quick | --full] [--threads 1] [--heldout a,b]

Needs a finished demo build. Writes only its own preset's section of the
results file (between markers), so the quick and the full results sit side by side.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.iterative import preset, run  # noqa: E402
from analysis.merging import MergeInputs, merge  # noqa: E402
from analysis.merging.scoring import merged_accuracy, reference_accuracy  # noqa: E402

OUT = ROOT / "docs" / "results_iterative.md"
ONE_SHOT = ("task_arithmetic", "tsv_m", "iso_c")
DEFAULT_HELDOUT = ("rotten_tomatoes", "crowdflower")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def md(df: pd.DataFrame, digits: int = 2) -> str:
    head = "| " + " | ".join([str(df.index.name or "")] + [str(c) for c in df.columns]) + " |"
    rule = "|" + "---|" * (len(df.columns) + 1)
    body = []
    for i, row in zip(df.index, df.itertuples(index=False)):
        cells = ["–" if isinstance(v, float) and pd.isna(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
                 for v in row]
        body.append("| " + " | ".join([str(i)] + cells) + " |")
    return "\n".join([head, rule] + body)


def timed(fn, *args, **kwargs):
    w, c = time.time(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.time() - w, time.process_time() - c


def progress(fraction, message):
    log(f"{100 * fraction:5.1f}% {message}")


def save_figure(fig, name: str, folder: Path) -> str | None:
    from analysis.report import ExportUnavailable, figure_bytes
    try:
        data = figure_bytes(fig, "png", width=1100, height=520)
    except ExportUnavailable as exc:
        log(f"figure {name} not exported: {exc}")
        return None
    path = folder / name
    path.write_bytes(data)
    return path.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick demo, quick preset (default)")
    which.add_argument("--full", action="store_true", help="the full demo, full preset")
    which.add_argument("--tiny", action="store_true", help="the tiny test demo (a smoke run; held out: its last task)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--heldout", default=",".join(DEFAULT_HELDOUT), help="ColD Fusion's held-out tasks")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = "full" if args.full else "tiny" if args.tiny else "quick"

    from analysis.zoo import build_tiny_demo, default_cache_dir, load_demo
    demo = build_tiny_demo(default_cache_dir(args.cache_dir)) if args.tiny else load_demo(args.cache_dir, quick=not args.full)
    ev, tvs = demo.evaluator, demo.tvs
    build = demo.manifest["config"]
    sizes = {t: ev.split_size(t, "train") for t in demo.tasks}
    heldout = [t for t in args.heldout.split(",") if t] if not args.tiny else demo.tasks[-1:]
    log(f"demo {demo.root.name}: {len(demo.tasks)} tasks; preset {name}; torch threads {torch.get_num_threads()}")
    ref = reference_accuracy(demo.reference, "test").reindex(demo.tasks)

    # ---------------------------------------------------------------- one-shot baselines
    inputs = MergeInputs(tvs, ev, persist=False)
    one_shot, one_shot_time = {}, {}
    for method in ONE_SHOT:
        result, w, c = timed(merge, inputs, method)
        (acc, w2, c2) = timed(merged_accuracy, ev, result, split="test")
        one_shot[method], one_shot_time[method] = acc, (w + w2, c + c2)
        log(f"{method}: mean test accuracy {sum(acc.values()) / len(acc):.4f} ({w + w2:.1f} s)")

    # ---------------------------------------------------------------- ATM
    atm_cfg = preset(name, "atm", demo.tasks, build, sizes)
    log(f"ATM: {atm_cfg.rounds} rounds, {atm_cfg.merge_method} {atm_cfg.knobs or '(defaults)'}, "
        f"steps per task {[atm_cfg.task_budget(t) for t in demo.tasks]}")
    atm, atm_w, atm_c = timed(run, atm_cfg, ev, args.cache_dir, progress)

    # ---------------------------------------------------------------- ColD Fusion
    contributors = [t for t in demo.tasks if t not in heldout]
    cold_cfg = preset(name, "cold_fusion", contributors, build, sizes, heldout=heldout)
    log(f"ColD Fusion: {cold_cfg.rounds} rounds, {len(contributors)} contributors, held out {heldout}, "
        f"short fine-tune {cold_cfg.heldout_steps} steps")
    cold, cold_w, cold_c = timed(run, cold_cfg, ev, args.cache_dir, progress)

    # ---------------------------------------------------------------- tables
    acc = atm.metric("accuracy")
    final = acc.loc[atm.rounds_done, demo.tasks]
    rows = {"zero-shot (linear probe)": ref["zero_shot"], "fine-tuned (own task)": ref["fine_tuned"]}
    for method in ONE_SHOT:
        rows[f"{method} (one-shot, defaults)"] = pd.Series(one_shot[method])
    rows[f"ATM, {atm_cfg.rounds} rounds ({atm_cfg.merge_method}, defaults)"] = final
    comp = pd.DataFrame(rows).T[demo.tasks] * 100
    comp["mean"] = comp.mean(axis=1)
    comp.index.name = "model (test accuracy, %)"

    def per_round(result, cfg, extra=()):
        t = result.table
        agg = t[t["task"].isin(["mean", "all"])].pivot_table(index="round", columns="metric", values="value")
        out = pd.DataFrame(index=agg.index)
        out["steps per task (cumulative)"] = [cfg.steps_done("", r) if r else 0 for r in agg.index]
        out["mean accuracy (%)"] = agg["mean_accuracy"] * 100
        for metric, label in extra:
            for task in list(cfg.heldout) + ["mean"]:
                sub = t[(t["metric"] == metric) & (t["task"] == task)].set_index("round")["value"]
                out[f"{label}: {task} (%)"] = sub * 100
        if "cosine" in agg:
            out["mean pairwise cosine"] = agg["cosine"]
            out["‖θ_r − θ_r−1‖"] = agg["update_norm"]
        out["wall s"] = [result.seconds.get(int(r), float("nan")) for r in agg.index]
        out.index.name = "round"
        return out

    atm_rounds = per_round(atm, atm_cfg)
    cold_rounds = per_round(cold, cold_cfg, [("heldout_probe_accuracy", "probe"),
                                             ("heldout_finetune_accuracy", "short FT")])

    # ---------------------------------------------------------------- figures
    from analysis.plots.iterative import accuracy_curves, geometry_curves, heldout_curves
    base = {f"{m} (one-shot)": sum(v.values()) / len(v) for m, v in one_shot.items()}
    figs = {f"iterative_{name}_atm_accuracy.png": accuracy_curves(atm.table, demo.tasks, baselines=base,
                                                                  title=f"ATM on the {name} demo: test accuracy"),
            f"iterative_{name}_atm_geometry.png": geometry_curves(atm.table, title="ATM: task vectors per round"),
            f"iterative_{name}_cold_heldout.png": heldout_curves(cold.table, heldout)}
    saved = [n for n in (save_figure(f, fname, Path(args.out).parent) for fname, f in figs.items()) if n]

    # ---------------------------------------------------------------- write
    cpu = platform.processor() or platform.machine()
    lines = [f"<!-- {name} -->", f"## {name.capitalize()} demo (`{demo.root.name}`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python benchmarks/iterative.py --{name} --threads "
             f"{args.threads}` on {cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
             f"{ev.device}. Test split; accuracy with each task's frozen linear-probe head.", "",
             f"### ATM ({atm_cfg.rounds} rounds) against one-shot merging at a matched budget", "",
             f"Every task is fine-tuned for the build's own budget ({atm_cfg.total_steps} steps per task, batch "
             f"{atm_cfg.batch_size}, lr {atm_cfg.lr:g}): once for the one-shot merges (the build's fine-tunes), "
             f"in {atm_cfg.rounds} rounds of {atm_cfg.steps(demo.tasks[0], 1)} steps for ATM; ATM merges each "
             f"round by {atm_cfg.merge_method} at its defaults.", "", md(comp), "",
             "Per round (round 0 = the pretrained model):", "", md(atm_rounds, 3), ""]
    lines += [f"### ColD Fusion ({cold_cfg.rounds} rounds): the fused model as a starting point", "",
              f"Contributors: {', '.join(contributors)}; held out (never fused): {', '.join(heldout)}. Each round "
              f"every contributor fine-tunes the shared model for {cold_cfg.steps(contributors[0], 1)} steps and the "
              f"fused model is their {cold_cfg.merge_method.replace('_', ' ')}. Held-out columns: a linear probe "
              f"trained on that round's features, and a {cold_cfg.heldout_steps}-step fine-tune from that round's "
              "model with the probe as its frozen head; round 0 is the original backbone.", "",
              md(cold_rounds, 3), ""]
    computed = [(label, w, c) for label, w, c in (("ATM", atm_w, atm_c), ("ColD Fusion", cold_w, cold_c))]
    lines += ["### Time", "",
              "| part | wall s (this invocation) | CPU s (this invocation) | wall s of its rounds when computed |",
              "|---|---|---|---|"]
    for label, w, c in computed:
        seconds = (atm if label == "ATM" else cold).seconds
        lines.append(f"| {label} | {w:.1f} | {c:.1f} | {sum(seconds.values()):.1f} |")
    for method, (w, c) in one_shot_time.items():
        lines.append(f"| {method} one-shot (merge + scoring) | {w:.1f} | {c:.1f} | – |")
    lines += ["", "A part read back from the cache shows a few seconds for this invocation; the last column is "
              "what its rounds took when they ran (the CPU was shared with other jobs: wall time is an upper "
              "bound)."]
    if saved:
        lines += ["", "Curves: " + ", ".join(f"![{n}]({n})" for n in saved)]
    lines += [f"<!-- /{name} -->"]
    section = "\n".join(lines)

    out = Path(args.out)
    text = out.read_text() if out.is_file() else ("# Iterative merging: ATM and ColD Fusion\n\n"
                                                  "Written by `benchmarks/iterative.py`; one section per preset.\n")
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    text = pattern.sub(lambda m: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)
    log(f"wrote {out}")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
