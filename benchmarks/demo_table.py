"""The merging results table on the built-in demo -> docs/results_merge.md.

Per task and on average, absolute and normalised (÷ fine-tuned) accuracy on
the test split for: zero-shot (linear probe), fine-tuned (each task's own
model), every merging method at its declared defaults, and the methods of
ALPHA_GRIDS and REMERGE_GRIDS with α (CART: λ) chosen on the validation split
(grids below; mean validation accuracy, ties broken by the smaller value).
TSV-C is a compression view: each task is scored with its own rank-⌊r/T⌋
model; EMR scores each task with its own masked, rescaled unified vector.
slerp is listed only when the demo has exactly two tasks.

    python benchmarks/demo_table.py [--quick | --full] [--val-subsample N]

Needs a finished demo build (`python -m analysis.zoo build [--quick]`).
Resumable: after every method its rows are saved (atomically) to a progress file in
the cache's bench/ folder, keyed by the build and every option; the same command,
run again after an interruption, reads those rows back and goes on with the next
method (`--no-resume` starts over). The file is removed once the table is written.
Every α of ALPHA_GRIDS is applied as evaluate_delta(merge(..., alpha=1), alpha=a):
those methods are linear in α (vector parameters included); RegMean++ and
CART's λ are not, so each of their values is merged anew. The data statistics (Fishers, Grams)
are computed once, timed, and reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.atomic import atomic_write_json  # noqa: E402
from analysis.device import device_info  # noqa: E402
from analysis.merging import METHODS, MergeInputs, merge, unavailable  # noqa: E402
from analysis.merging.scoring import (accuracy_by_task, merged_accuracy, reference_accuracy,  # noqa: E402
                                     reference_on_examples)

ALPHA_GRIDS = {
    "task_arithmetic": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
    "ties": [0.6, 0.8, 1.0, 1.3, 1.6],
    "tsv_m": [0.6, 0.8, 1.0, 1.3, 1.6],
    "iso_c": [0.6, 0.8, 1.0, 1.3, 1.6],
    # averaging-type data-aware merges (α = 1 is the paper; TA's best α·T is ≈ 2.4 here)
    "fisher": [1.0, 1.5, 2.0, 2.5, 3.0],
    "regmean": [1.0, 1.5, 2.0, 2.5, 3.0],
    "epimer": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
    # sums like Task Arithmetic / elect-and-average like TIES / averages (Model Stock's t shrinks the mean further)
    "breadcrumbs": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
    "della": [0.6, 0.8, 1.0, 1.3, 1.6],
    "model_stock": [1.0, 1.5, 2.0, 2.5, 3.0],
    "karcher": [1.0, 1.5, 2.0, 2.5, 3.0],
    # WUDI's exact minimiser has an average's scale, like RegMean; KnOTS (TIES inside) is scaled like TIES
    "wudi": [1.0, 1.5, 2.0, 2.5, 3.0],
    "knots": [0.6, 0.8, 1.0, 1.3, 1.6],
}
# LiNeS has no global α (its α is the paper's norm rule; β is not linear): it is listed at its defaults.
# RegMean++ is not linear in α (deeper blocks' Grams come from the α-scaled merge): each α is a new merge.
# CART's λ scales only the low-rank part (δ = τ̄ + λ·…); its SVDs are memoised, so a λ is cheap.
REMERGE_GRIDS = {"regmean_pp": [1.0, 2.0, 3.0], "cart": [1.0, 2.0, 3.0]}
REMERGE_KNOB = {"cart": "lam"}   # the knob a REMERGE_GRIDS grid sets (default: alpha)
KEEP_MARKER = "<!-- kept by benchmarks/demo_table.py: text below this line is not regenerated -->"
OUT = Path(__file__).resolve().parents[1] / "docs" / "results_merge.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """A DataFrame as a GitHub markdown table (index as the first column)."""
    head = "| " + " | ".join([str(df.index.name or "")] + [str(c) for c in df.columns]) + " |"
    rule = "|" + "---|" * (len(df.columns) + 1)
    body = ["| " + " | ".join([str(i)] + ["–" if pd.isna(v) else f"{v:.{digits}f}" for v in row]) + " |"
            for i, row in zip(df.index, df.itertuples(index=False))]
    return "\n".join([head, rule, *body])


def progress_file(demo, chosen: list[str], args) -> Path:
    """Where an interrupted run of this command keeps its finished rows: keyed by the build, every option
    and the grids, so only the same command on the same build resumes from it."""
    from analysis.zoo import default_cache_dir
    key = json.dumps({"build": str(demo.root), "finished": demo.manifest.get("finished"), "methods": chosen,
                      "val": args.val_subsample, "test": args.test_subsample, "defaults_only": args.defaults_only,
                      "out": str(Path(args.out).resolve()), "alpha": ALPHA_GRIDS, "remerge": REMERGE_GRIDS},
                     sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return default_cache_dir(args.cache_dir) / "bench" / f"demo_table-{digest}.json"


def in_memory(tvs):
    """The same set with every tensor read once into RAM (each merge re-reads all deltas)."""
    from analysis.taskvectors import TaskVectorSet
    base = {k: tvs.base.get(k) for k in tvs.base.keys() if k not in tvs.excluded}
    tasks = {}
    for t in tvs.tasks:
        sd = dict(base)
        for n in tvs.param_names:
            sd[n] = (base[n].float() + tvs.delta(t, n)).to(base[n].dtype)
        tasks[t] = sd
    return TaskVectorSet.from_state_dicts(base, tasks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="use the --quick build")
    g.add_argument("--full", action="store_true", help="use the full build")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--val-subsample", type=int, default=None,
                    help="examples per task for the α search on validation (default: the full split)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--test-subsample", type=int, default=None,
                    help="score the test split on a fixed, seeded subsample of N examples per task (default: "
                         "all; the table says which)")
    ap.add_argument("--defaults-only", action="store_true",
                    help="only each method at its declared defaults (no α / λ search on validation)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names (default: every registered method); the table says "
                         "which were left out")
    ap.add_argument("--no-resume", action="store_true",
                    help="ignore the rows an interrupted run of the same command saved, and start over")
    args = ap.parse_args(argv)
    chosen = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; the methods are {', '.join(METHODS)}")

    from analysis.zoo import load_demo
    t_start = time.perf_counter()
    demo = load_demo(args.cache_dir, quick=True if args.quick else False if args.full else None)
    tvs, ev = in_memory(demo.tvs), demo.evaluator
    tasks = [t for t in tvs.tasks if t in ev.tasks]
    log(f"demo: {demo.root} ({demo.kind}), tasks {tasks}")
    # with a test subsample the references are scored on exactly the merged models' examples
    reference = demo.reference if args.test_subsample is None else \
        reference_on_examples(ev, tvs, "test", args.test_subsample)
    ref_test = reference_accuracy(reference, "test").reindex(tasks)
    inputs = MergeInputs(tvs, ev)
    rows: list[dict] = []
    notes: list[str] = []
    progress_path = progress_file(demo, chosen, args)
    saved = {} if args.no_resume or not progress_path.is_file() else json.loads(progress_path.read_text())
    if saved:
        rows, notes = saved["rows"], saved["notes"]
        log(f"resuming: {len(saved['done'])} method(s) read back from {progress_path}")

    def save_progress(done: list[str]) -> None:
        atomic_write_json(progress_path, {"rows": rows, "notes": notes, "done": done,
                                          "stats_seconds": saved.get("stats_seconds", stats_seconds),
                                          "elapsed_s": saved.get("elapsed_s", 0.0) + time.perf_counter() - t_start})

    def add(label, method, knobs, per_task, seconds=None):
        rows.append({"model": label, "method": method, "knobs": knobs, "merge_s": seconds,
                     **{t: per_task.get(t) for t in tasks}})
        mean = sum(per_task[t] for t in tasks) / len(tasks)
        log(f"{label}: mean test accuracy {mean:.4f}")

    stats_seconds = {}
    t0 = time.perf_counter()
    inputs.spectra().compute()     # before the loop, so no method's merge time carries the SVDs
    stats_seconds["per-layer SVD factors of every task"] = time.perf_counter() - t0
    if inputs.has_data:
        for label, compute in (("diagonal Fisher, 256 examples per task", lambda: inputs.fisher(n=256)),
                               ("input Grams of every linear layer, 256 examples per task",
                                lambda: inputs.activation_grams(n=256))):
            t0 = time.perf_counter()
            compute()
            stats_seconds[label] = time.perf_counter() - t0
            log(f"statistics: {label}: {stats_seconds[label]:.1f} s")
    done = list(saved.get("done", []))
    if not saved:
        add("zero-shot (linear probe)", "zero_shot", "", ref_test["zero_shot"].to_dict())
        add("fine-tuned (own task)", "fine_tuned", "", ref_test["fine_tuned"].to_dict())
        skipped = [m for m in METHODS if m not in chosen]
        if skipped:
            notes.append(f"Not run this time (`--methods`): {', '.join(skipped)}.")
    for name, spec in ((m, METHODS[m]) for m in chosen if m not in done):
        why = unavailable(name, len(tvs.tasks), inputs.has_data)
        if why:
            notes.append(f"`{name}` is not listed: it {why}.")
            done.append(name)
            save_progress(done)
            continue
        t0 = time.perf_counter()
        defaults = spec.defaults(len(tvs.tasks))
        delta = merge(inputs, name)
        t_merge = time.perf_counter() - t0
        acc = merged_accuracy(ev, delta, split="test", subsample=args.test_subsample)
        knobs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in defaults.items())
        add(f"{name} (defaults)", name, knobs, acc, t_merge)
        log(f"  merge {t_merge:.1f} s, total {time.perf_counter() - t0:.1f} s")
        if name in REMERGE_GRIDS and not args.defaults_only:
            knob = REMERGE_KNOB.get(name, "alpha")
            best, best_mean = None, -1.0
            for a in REMERGE_GRIDS[name]:
                t0 = time.perf_counter()
                cand = merge(inputs, name, **{knob: a})
                t_cand = time.perf_counter() - t0
                acc_v = merged_accuracy(ev, cand, split="validation", subsample=args.val_subsample)
                mean_v = sum(acc_v[t] for t in tasks) / len(tasks)
                log(f"  {name} {knob}={a}: validation mean {mean_v:.4f} ({time.perf_counter() - t0:.1f} s)")
                if mean_v > best_mean + 1e-12:
                    best, best_mean, best_delta, best_s = a, mean_v, cand, t_cand
            rest = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in defaults.items() if k != knob)
            add(f"{name} ({knob} on validation)", name,
                f"{knob}={best} (val mean {best_mean:.4f})" + (f", {rest}" if rest else ""),
                merged_accuracy(ev, best_delta, split="test", subsample=args.test_subsample), best_s)
        if name in ALPHA_GRIDS and not args.defaults_only:
            t0 = time.perf_counter()
            unit = merge(inputs, name, alpha=1.0)
            t_unit = time.perf_counter() - t0
            best, best_mean = None, -1.0
            for a in ALPHA_GRIDS[name]:
                df = ev.evaluate_delta(unit, alpha=a, split="validation", subsample=args.val_subsample)
                acc_v = accuracy_by_task(df)
                mean_v = sum(acc_v[t] for t in tasks) / len(tasks)
                log(f"  {name} α={a}: validation mean {mean_v:.4f}")
                if mean_v > best_mean + 1e-12:
                    best, best_mean = a, mean_v
            df = ev.evaluate_delta(unit, alpha=best, split="test", subsample=args.test_subsample)
            acc = accuracy_by_task(df)
            rest = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in defaults.items() if k != "alpha")
            add(f"{name} (α on validation)", name, f"alpha={best} (val mean {best_mean:.4f})" + (f", {rest}" if rest else ""),
                acc, t_unit)
        done.append(name)
        save_progress(done)

    table = pd.DataFrame(rows)
    ft = ref_test["fine_tuned"]
    absolute = table.set_index("model")[tasks] * 100
    absolute["average"] = absolute[tasks].mean(axis=1)
    normalised = table.set_index("model")[tasks].div(ft, axis=1) * 100
    normalised["average"] = normalised[tasks].mean(axis=1)
    # methods ordered by mean normalised accuracy (the ordering); the wall time of one merge beside them
    order = normalised["average"].sort_values(ascending=False).index
    normalised, absolute = normalised.loc[order], absolute.loc[order]
    seconds = table.set_index("model")["merge_s"]
    normalised["merge s"] = seconds.reindex(order).astype(float)
    info = device_info()
    elapsed = saved.get("elapsed_s", 0.0) + time.perf_counter() - t_start
    stats_seconds = saved.get("stats_seconds", stats_seconds)   # as first computed, not as read back
    sizes = {t: ev.split_size(t, "test") for t in tasks} if hasattr(ev, "split_size") else {}
    if args.test_subsample is not None:
        sizes = {t: min(n, args.test_subsample) for t, n in sizes.items()}
    lines = [
        "# Merging results on the built-in demo (test split)",
        "",
        f"Written by `python benchmarks/demo_table.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device: {info['name']} ({info['device']}), "
        f"torch {info['torch']}, Python {platform.python_version()}; run time {elapsed / 60:.1f} min"
        + (f" (over more than one invocation: {len(saved['done'])} of {len(chosen)} methods were read back from "
           "an interrupted run of the same command)" if saved else "") + ".",
        f"Demo build: `{demo.root}` ({demo.kind}); backbone task vectors over {len(tasks)} tasks.",
        (f"Test examples per task: {sizes}" + ("" if args.test_subsample is None else
         f" (a fixed, seeded subsample of at most {args.test_subsample} per task; the zero-shot and fine-tuned "
         "rows are scored on the same examples)") + ".") if sizes else "",
        *(["Every method at its declared defaults only (`--defaults-only`: no α / λ search)."]
          if args.defaults_only else []),
        *([] if args.defaults_only else ["α chosen on the " + ("full validation split" if args.val_subsample is None
                              else f"validation subsample of {args.val_subsample} per task") +
        " by mean accuracy over the grids " + "; ".join(f"{k}: {v}" for k, v in ALPHA_GRIDS.items()) +
        "; re-merged per value: " + "; ".join(f"{k} {REMERGE_KNOB.get(k, 'alpha')}: {v}"
                                             for k, v in REMERGE_GRIDS.items()) + "."]),
        "Normalised accuracy = merged ÷ fine-tuned accuracy of that task (%). "
        "TSV-C and EMR rows score each task with its own model (not one merge). AdaMerging learns its "
        "coefficients from the entropy of the test inputs' predictions (no labels), as the paper does.",
        *([("Factors and data statistics (computed once, cached by content; statistics on the train split): "
            + "; ".join(f"{k}: {v:.1f} s" for k, v in stats_seconds.items()) + ".")] if stats_seconds else []),
        "",
        "## Configurations",
        "",
        "| model | knobs |",
        "|---|---|",
        *[f"| {r['model']} | {r['knobs']} |" for r in rows],
        "",
        "## Absolute accuracy (%)",
        "",
        markdown(absolute),
        "",
        "## Normalised accuracy (% of fine-tuned), best first",
        "",
        "`merge s`: wall time of one merge, scoring excluded; – for references. A defaults row times the "
        "method's first merge, with the spectra and data statistics already computed (their own time is above) "
        "but anything the method computes for itself included (Iso-C's SVD of each task sum, for one); an "
        "'on validation' row times a later merge of the same method, which reuses what the first one memoised, "
        "so it can be far shorter.",
        "",
        markdown(normalised),
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written sections after the marker (methods notes, benchmarks/merge.py timings) are kept
    tail = ""
    if out.is_file() and KEEP_MARKER in out.read_text():
        tail = out.read_text().split(KEEP_MARKER, 1)[1]
    out.write_text("\n".join(lines) + "\n" + KEEP_MARKER + tail)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
