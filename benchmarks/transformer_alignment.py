"""Aligning small BERT encoders trained from different seeds (issue 15's measurements).

    nice -n 10 .venv/bin/python benchmarks/transformer_alignment.py [--kind quick] \
        [--out docs/results_transformer_alignment.md]

Models: the transformer zoo (`python -m analysis.zoo build-transformers [--quick]`),
one encoder + per-task heads per seed, scored by the mean over the text tasks
of each head's test accuracy / cross-entropy.

Measures:
1. every model's test accuracy per task, against the majority class;
2. for every pair of seeds, the loss / accuracy barrier along the straight
   path: naive, and weight matching (WM) and activation matching (AM, Verma &
   Elbayad 2024) each ± REPAIR; both barrier definitions
   (analysis.permutation.barrier);
3. merging N = 3 and 4 models: naive average, pairwise WM / AM to model 0,
   C2M3 (started from pairwise WM), each ± REPAIR; cycle errors;
4. similarity of representations by layer (mean-pooled residual stream):
   linear CKA, relative-representation similarity and mean unit correlation,
   B vs A before and after alignment, and the merged model vs A (naive vs
   aligned merge);
5. Relative Latent Space Aggregation: per task, probes on each model's own
   absolute and relative space, on the mean of all models' relative spaces,
   and zero-shot stitching across models;
6. wall times of every step (the CPU is shared: upper bounds).

Every finished section (and every pair) is kept under
~/.cache/mergescope/transformer-bench/<zoo>-<options>/ so an interrupted run
resumes where it stopped (`--fresh` ignores it); wall times are those of the
run that computed each section.

REPAIR for these post-LayerNorm networks: the per-unit mean and std over
tokens of every LayerNorm output (the residual stream; corrected through the
LayerNorm's weight and bias) and of every FFN pre-activation (through the FFN
input projection) are reset to the interpolation of the endpoints'
statistics, measured on training tokens of all tasks. Q, K, V are not
renormalised.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.barriers import BARRIERS  # noqa: E402
from analysis.latent import aggregation_table, choose_anchors, similarity_by_layer  # noqa: E402
from analysis.permutation import barriers, c2m3, cycle_error, interpolation_curve  # noqa: E402
from analysis.permutation.activation_matching import activation_matching  # noqa: E402
from analysis.permutation.pipeline import bert_family, merge_models  # noqa: E402
from analysis.permutation.repair import repair  # noqa: E402
from analysis.permutation.specs import apply_permutation  # noqa: E402
from analysis.permutation.transformer import bert_spec, evaluate_heads, layer_features, pooled  # noqa: E402
from analysis.permutation.weight_matching import weight_matching  # noqa: E402
from analysis.zoo.transformers import load_transformer_zoo  # noqa: E402

# the pair table's columns by the names every page shows (analysis/barriers.py)
PAIR_COLUMNS = {"loss barrier (midpoint)": f"loss: {BARRIERS['midpoint'].label}",
                "loss barrier (linear)": f"loss: {BARRIERS['path'].label}",
                "acc. barrier (linear)": f"accuracy: {BARRIERS['path'].label}"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def md(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default=None, help="zoo preset: quick | full (default: the best built)")
    ap.add_argument("--lambdas", type=int, default=11)
    ap.add_argument("--match-per-task", type=int, default=64, help="training sequences per task for AM and REPAIR")
    ap.add_argument("--eval-per-task", type=int, default=None, help="test sequences per task (default: all)")
    ap.add_argument("--anchors", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results_transformer_alignment.md")
    ap.add_argument("--fresh", action="store_true", help="recompute every section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.time()
    zoo = load_transformer_zoo(kind=args.kind)
    names = list(zoo.models)
    sds = [zoo.models[k] for k in names]
    H, eps = zoo.n_heads, zoo.eps
    spec = bert_spec(sds[0], H)
    fam = bert_family(H, eps)
    test = zoo.split("test", args.eval_per_task)
    match_x, _ = zoo.pooled_tokens("train", args.match_per_task)
    lams = [i / (args.lambdas - 1) for i in range(args.lambdas)]
    times: list[dict] = []
    import hashlib
    import pickle
    opts = hashlib.sha256(repr((args.lambdas, args.match_per_task, args.eval_per_task, args.anchors)).encode())
    state_dir = Path.home() / ".cache" / "mergescope" / "transformer-bench" / f"{zoo.root.name}-{opts.hexdigest()[:10]}"
    state_dir.mkdir(parents=True, exist_ok=True)

    def resumable(section, fn):
        """fn() -> result, its times kept with it; reloaded when already computed."""
        path = state_dir / f"{section}.pkl"
        if path.is_file() and not args.fresh:
            result, t = pickle.loads(path.read_bytes())
            times.extend(t)
            log(f"{section}: reused from {path}")
            return result
        n0 = len(times)
        result = fn()
        path.write_bytes(pickle.dumps((result, times[n0:])))
        return result

    def timed(what, fn):
        t0 = time.time()
        out = fn()
        times.append({"step": what, "seconds": round(time.time() - t0, 2)})
        return out

    def ev(sd):
        return evaluate_heads(sd, test, H, eps, device="cpu")

    cfg = zoo.manifest["config"]
    log(f"zoo {zoo.root.name}: {names}, {len(zoo.tasks)} tasks, {H} heads")

    # 1. individual models
    rows = []
    for k, sd in zip(names, sds):
        per = {t: evaluate_heads(sd, {t: test[t]}, H, eps, device="cpu")["accuracy"] for t in zoo.tasks}
        rows.append({"model": k, **per, "mean": sum(per.values()) / len(per)})
    maj = zoo.manifest["majority_test_accuracy"]
    rows.append({"model": "majority class", **maj, "mean": sum(maj.values()) / len(maj)})
    individual = pd.DataFrame(rows)
    log("individual models done")

    # 2. pairs
    pair_rows = []
    aligned_cache = {}

    def one_pair(i, j):
        rows_ij = []
        a, b = sds[i], sds[j]
        wm = timed(f"weight matching {i}-{j}", lambda: weight_matching(a, b, spec, device="cpu"))
        am = timed(f"activation matching {i}-{j}", lambda: activation_matching(a, b, spec, fam.group_features,
                                                                              match_x, device="cpu"))
        b_wm, b_am = apply_permutation(b, spec, wm), apply_permutation(b, spec, am)
        agree = sum(int((wm[g] == am[g]).sum()) for g in wm) / sum(len(wm[g]) for g in wm)

        def rep_for(b_al):
            layers = fam.repair_layers(a)
            return lambda sd, lam: repair(sd, [a, b_al], layers, fam.preactivations, match_x, weights=[1 - lam, lam],
                                          device="cpu")

        for label, other, fn in (("naive", b, None), ("weight matching", b_wm, None), ("weight matching + REPAIR", b_wm, rep_for(b_wm)),
                                 ("activation matching", b_am, None),
                                 ("activation matching + REPAIR", b_am, rep_for(b_am))):
            curve = timed(f"path {i}-{j} {label}", lambda: interpolation_curve(ev, a, other, lams, repair_fn=fn))
            lb, ab = barriers(curve, "loss"), barriers(curve, "accuracy")
            mid = curve[curve.lam == 0.5].set_index("metric")["value"] if 0.5 in lams else {}
            rows_ij.append({"pair": f"{names[i]} – {names[j]}", "method": label,
                              "loss barrier (midpoint)": lb["midpoint"], "loss barrier (linear)": lb["path"],
                              "acc. barrier (linear)": ab["path"],
                              "loss at λ=½": float(mid["loss"]) if len(mid) else float("nan"),
                              "acc. at λ=½": float(mid["accuracy"]) if len(mid) else float("nan")})
        rows_ij.append({"pair": f"{names[i]} – {names[j]}", "method": f"(WM and AM agree on {agree:.1%} of units)",
                        "loss barrier (midpoint)": float("nan"), "loss barrier (linear)": float("nan"),
                        "acc. barrier (linear)": float("nan"), "loss at λ=½": float("nan"),
                        "acc. at λ=½": float("nan")})
        log(f"pair {i}-{j} done")
        return rows_ij, am

    for i, j in itertools.combinations(range(len(sds)), 2):
        rows_ij, am = resumable(f"pair_{i}-{j}", lambda: one_pair(i, j))
        pair_rows += rows_ij
        aligned_cache[(i, j)] = apply_permutation(sds[j], spec, am)
    pairs = pd.DataFrame(pair_rows)

    # 3. N-model merges
    def merges_for(n):
        merge_rows, cyc_rows = [], []
        group = sds[:n]
        res = timed(f"C2M3 on {n} models", lambda: c2m3(group, spec, device="cpu", init="weight_matching"))
        for method in ("none", "weight_matching", "activation_matching", "c2m3"):
            for rep in (False, True):
                merged = timed(f"merge {n} {method}{' + REPAIR' if rep else ''}", lambda: merge_models(
                    group, spec, method, family=fam, match_x=match_x, repair_x=match_x if rep else None,
                    c2m3_result=res))
                m = ev(merged)
                merge_rows.append({"N": n, "method": {"none": "naive", "weight_matching": "pairwise WM",
                                                      "activation_matching": "pairwise AM", "c2m3": "C2M3"}[method]
                                   + (" + REPAIR" if rep else ""), "accuracy": m["accuracy"], "loss": m["loss"]})
        mean_single = sum(ev(sd)["accuracy"] for sd in group) / n
        merge_rows.append({"N": n, "method": "(mean of the single models)", "accuracy": mean_single,
                           "loss": float("nan")})
        cyc = [(k, (k + 1) % n) for k in range(n)]
        for label, maps in (("pairwise WM", [weight_matching(group[p], group[q], spec, device="cpu") for p, q in cyc]),
                            ("pairwise AM", [activation_matching(group[p], group[q], spec, fam.group_features, match_x,
                                                                 device="cpu") for p, q in cyc]),
                            ("C2M3", [res.pairwise(p, q) for p, q in cyc])):
            e = cycle_error(maps)
            cyc_rows.append({"N": n, "method": label, "mean cycle error": sum(e.values()) / len(e),
                             "max cycle error": max(e.values())})
        log(f"merges of {n} done")
        return merge_rows, cyc_rows

    merge_rows, cyc_rows = [], []
    for n in (3, 4):
        if n <= len(sds):
            mr, cr = resumable(f"merges_{n}", lambda: merges_for(n))
            merge_rows += mr
            cyc_rows += cr
    merges, cycles = pd.DataFrame(merge_rows), pd.DataFrame(cyc_rows)

    # 4. similarity by layer (pair 0-1, activation matching)
    def latent_sections():
        x_all, _ = zoo.pooled_tokens("test", args.eval_per_task)
        idx = choose_anchors(len(x_all), min(args.anchors, len(x_all)))
        fa = layer_features(sds[0], x_all, H, eps)
        b_am = aligned_cache[(0, 1)]
        sim = []
        for label, other in (("B vs A, before alignment", sds[1]), ("B vs A, after AM", b_am),
                             ("naive merge vs A", merge_models(sds[:2], spec, "none", family=fam)),
                             ("AM merge vs A", merge_models(sds[:2], spec, "activation_matching", family=fam,
                                                            match_x=match_x))):
            t = similarity_by_layer(fa, layer_features(other, x_all, H, eps), idx).assign(comparison=label)
            sim.append(t)
        sim = pd.concat(sim).pivot_table(index=["comparison", "measure"], columns="layer", values="value",
                                         sort=False).reset_index()
        log("similarity done")

        # 5. aggregation per task (last layer, mean-pooled)
        agg = []
        for t in zoo.tasks:
            (trx, trY), (tex, teY) = zoo.data[t]["train"], zoo.data[t]["test"]
            with torch.no_grad():
                tr = {k: pooled(sd, trx, H, eps) for k, sd in zip(names, sds)}
                te = {k: pooled(sd, tex, H, eps) for k, sd in zip(names, sds)}
            agg.append(aggregation_table(tr, trY, te, teY, n_anchors=args.anchors).assign(task=t))
        agg = pd.concat(agg)
        agg_summary = agg.groupby(["space", "model"], sort=False)["accuracy"].mean().reset_index()
        agg_summary = agg_summary.rename(columns={"accuracy": "mean test accuracy over tasks"})
        log("aggregation done")

        return sim, agg_summary

    sim, agg_summary = resumable("latent", latent_sections)

    total = time.time() - t_all
    load = os.getloadavg()
    lines = [
        "# Aligning small BERT encoders from different seeds: measured results", "",
        f"- Command: `.venv/bin/python benchmarks/transformer_alignment.py {' '.join(argv or sys.argv[1:])}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} torch "
        f"thread(s), CPU; load average at the end {tuple(round(v, 1) for v in load)} (2 cores shared with other "
        "jobs: every time is an upper bound)",
        f"- Zoo: `{zoo.root.name}` ({zoo.manifest['kind']} preset): {len(names)} seeds, BERT encoders with "
        f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, FFN {cfg['ffn']}, vocabulary "
        f"{zoo.manifest['vocab_size']} (MiniLM WordPiece, cut to the training tokens), max {cfg['max_length']} tokens, "
        f"trained from scratch for {cfg['steps']} multi-task steps (batch {cfg['batch']}, AdamW lr {cfg['lr']}); "
        f"build time {zoo.manifest['build_seconds']} s.",
        f"- Metrics: mean over the {len(zoo.tasks)} tasks of each task head's test accuracy / cross-entropy "
        f"({', '.join(f'{t} {len(test[t][1])}' for t in zoo.tasks)} test examples).",
        f"- Activation matching and REPAIR statistics: {args.match_per_task} training sequences per task "
        f"({len(match_x)} in all, every non-padding token).",
        f"- Run time of the invocation that wrote this file {total:.0f} s (sections reused from an interrupted "
        "run keep their own times in the last table).", "",
        "## Individual models (test accuracy)", "", md(individual, ".3f"), "",
        "## Barriers between every pair of seeds", "",
        "Barrier definitions (analysis/barriers.py, the same two, by the same names, on every page): "
        f"*{BARRIERS['path'].label}* = {BARRIERS['path'].formula}; *{BARRIERS['midpoint'].label}* = "
        f"{BARRIERS['midpoint'].formula} (negative where the path bends below the line between its ends); for "
        f"accuracy both are taken on −accuracy, so a positive value is a dip; λ on {args.lambdas} points. "
        "REPAIR (post-LayerNorm networks): every LayerNorm output (the residual stream; corrected through the "
        "LayerNorm's weight and bias) and every FFN pre-activation (through the FFN input projection) gets, per "
        "unit, the (1−λ, λ) interpolation of the endpoints' token mean and std; Q, K, V are left alone.", "",
        md(pairs.rename(columns=PAIR_COLUMNS)), "",
        "## Merging N models (uniform average)", "",
        "Pairwise WM / AM: every model aligned to model 0, then averaged. C2M3: Frank-Wolfe over the valid "
        "permutations of all models jointly, started from pairwise WM, merged in the universe.", "",
        md(merges), "", "Cycle error around 0 → 1 → … → N−1 → 0 (fraction of units, mean and max over groups):", "",
        md(cycles), "",
        "## Similarity of representations by layer (seeds 0 and 1)", "",
        "Mean-pooled residual stream after the embeddings and after every layer, on all test sequences. Linear CKA "
        "and relative similarity are invariant to a permutation of units, so alignment leaves them unchanged for "
        "B vs A; the mean unit correlation is what alignment raises. The merged rows compare a merge of A and B "
        f"with A. Relative similarity uses {args.anchors} anchors.", "",
        md(sim), "",
        "## Relative Latent Space Aggregation (last layer, mean over tasks)", "",
        f"Per task: anchors = {args.anchors} training sequences; logistic-regression probes (C = 1) on standardised "
        "features, trained on the task's training split, scored on its test split; accuracies averaged over the "
        "tasks. *Zero-shot stitching*: a probe trained on one model's space, tested on another's, mean over "
        "ordered pairs.", "",
        md(agg_summary), "",
        "## Wall times", "", md(pd.DataFrame(times).groupby(
            pd.DataFrame(times)["step"].str.replace(r" \d+(-\d+)?", "", regex=True), sort=False)["seconds"]
            .agg(["count", "mean", "max"]).reset_index(), ".2f"), "",
    ]
    Path(args.out).write_text("\n".join(lines))
    log(f"wrote {args.out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
