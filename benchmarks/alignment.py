"""Permutation alignment on MNIST MLPs from several seeds (issue 7's measurements).

    nice .venv/bin/python benchmarks/alignment.py [--epochs 2] [--out docs/results_alignment.md]

Models: the built demo's MNIST MLPs when a build with >= 5 of them exists
(analysis.zoo.load_demo), otherwise five 784-512-512-512-10 MLPs trained here
with the zoo's recipe (analysis.zoo.mnist.train_mlp: Adam, batch 128) and kept
in ~/.cache/mergescope/alignment-bench/ so reruns skip training.

Measures, on the MNIST test split (10k):
1. test-loss barrier between two seeds: naive, weight matching (WM),
   WM + REPAIR, C2M3 with two models; both barrier definitions;
2. merging 3, 4, 5 models: accuracy / loss of naive averaging, WM to model 0,
   C2M3 in the universe, each with and without REPAIR;
3. cycle error of pairwise WM vs C2M3 (3-cycle 0->1->2->0 and 5-cycle);
4. wall time of C2M3 on 5 models on this machine's CPU (GPU: only when the
   script runs on one; it reports the device it used).
REPAIR statistics come from 10k training images. Everything is written to
the markdown file with the command and date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info, get_device  # noqa: E402
from analysis.permutation import (apply_permutation, barriers, c2m3, cycle_error, interpolation_curve,  # noqa: E402
                                  linear_chain_names, merge_in_universe, mlp_spec_from_state_dict, random_perms,
                                  weight_matching)
from analysis.permutation.mlp import evaluate_mlp, mlp_preactivations, mlp_repair_layers  # noqa: E402
from analysis.permutation.repair import repair  # noqa: E402

WIDTHS = (784, 512, 512, 512, 10)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_models(n: int, epochs: float, cache: Path, device) -> tuple[list[dict], str]:
    from safetensors.torch import load_file, save_file
    try:
        from analysis.zoo import load_demo
        demo = load_demo()
        if demo.mnist_dataset == "mnist" and len(demo.mnist_paths) >= n:
            return [load_file(str(p)) for p in demo.mnist_paths[:n]], f"built demo ({demo.root.name})"
    except Exception as e:  # no demo built (DemoNotBuilt) or an incomplete one: train our own
        log(f"demo MLPs not available ({type(e).__name__}); using (or training) {n} models in {cache}")
    from analysis.zoo.mnist import train_mlp
    cache.mkdir(parents=True, exist_ok=True)
    sds = []
    for seed in range(n):
        path = cache / f"mlp_{'-'.join(map(str, WIDTHS))}_ep{epochs}_seed{seed}.safetensors"
        if not path.is_file():
            t0 = time.time()
            model, _ = train_mlp("mnist", WIDTHS, seed, epochs, device)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            log(f"trained seed {seed} in {time.time() - t0:.0f} s")
        sds.append(load_file(str(path)))
    return sds, f"trained by this script: {epochs} epochs of Adam (lr 1e-3, batch 128), seeds 0-{n - 1}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--lambdas", type=int, default=11)
    ap.add_argument("--repair-samples", type=int, default=5000)
    ap.add_argument("--pairs", default="0-1")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "mergescope" / "alignment-bench"))
    ap.add_argument("--out", default="docs/results_alignment.md")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = get_device()
    t_start = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from analysis.zoo.mnist import load_mnist
    x_train, _ = load_mnist("train")
    x_rep = x_train[: args.repair_samples]
    xt, yt = load_mnist("test")
    sds, source = load_models(args.models, args.epochs, Path(args.cache), device)
    spec = mlp_spec_from_state_dict(sds[0])
    layers = mlp_repair_layers(sds[0])
    ev = lambda sd: evaluate_mlp(sd, xt, yt, device=device)  # noqa: E731

    def save(res: dict, final: bool = False) -> None:
        """Written after every section, so an interrupted run keeps what it measured."""
        res["meta"] = {"source": source, "device": device_info(device), "torch_threads": torch.get_num_threads(),
                       "python": platform.python_version(), "total_s": time.time() - t_start,
                       "loadavg": os.getloadavg(), "complete": final, "repair_samples": args.repair_samples,
                       "lambdas": args.lambdas, "widths": [int(sds[0][f"{n}.weight"].shape[1]) for n in
                                                           linear_chain_names(sds[0])[:1]]
                       + [int(sds[0][f"{n}.weight"].shape[0]) for n in linear_chain_names(sds[0])],
                       "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "command": "nice .venv/bin/python benchmarks/alignment.py " + " ".join(argv or sys.argv[1:])}
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.write_text(render(res))

    res: dict = {"models": [ev(sd) for sd in sds]}
    for i, r in enumerate(res["models"]):
        log(f"model {i}: test acc {r['accuracy']:.4f} loss {r['loss']:.4f}")

    # 0. known answer on the real models: seed 0 and two randomly permuted copies of it ----------
    copies = [sds[0]] + [apply_permutation(sds[0], spec, random_perms(spec.sizes(sds[0]), s)) for s in (101, 102)]
    p01 = weight_matching(copies[0], copies[1], spec, device=device)
    wm_ok = all(torch.equal(apply_permutation(copies[1], spec, p01)[k], sds[0][k]) for k in sds[0])
    rc = c2m3(copies, spec, device=device)
    c2_ok = all(torch.equal(apply_permutation(copies[j], spec, rc.pairwise(0, j))[k], sds[0][k])
                for j in (1, 2) for k in sds[0])
    res["sanity"] = {"wm_recovers": wm_ok, "c2m3_recovers": c2_ok, "c2m3_iterations": rc.iterations}
    log(f"permuted copies: WM recovers {wm_ok}, C2M3 recovers {c2_ok} ({rc.iterations} iterations)")
    save(res)

    # 1. barriers between two seeds ------------------------------------------------------------
    lams = [i / (args.lambdas - 1) for i in range(args.lambdas)]
    res["barriers"] = []
    for pair in args.pairs.split(","):
        i, j = map(int, pair.split("-"))
        a, b = sds[i], sds[j]
        t0 = time.perf_counter()
        p_wm = weight_matching(a, b, spec, seed=0, device=device)
        t_wm = time.perf_counter() - t0
        b_wm = apply_permutation(b, spec, p_wm)
        t0 = time.perf_counter()
        r2 = c2m3([a, b], spec, device=device)
        t_c2 = time.perf_counter() - t0
        b_c2 = apply_permutation(b, spec, r2.pairwise(0, 1))

        def rep(sd, lam, a=a, bb=b_wm):
            return repair(sd, [a, bb], layers, mlp_preactivations, x_rep, weights=[1 - lam, lam], device=device)

        for label, other, fn in (("naive", b, None), ("weight matching", b_wm, None),
                                 ("weight matching + REPAIR", b_wm, rep), ("C2M3 (2 models)", b_c2, None)):
            curve = interpolation_curve(ev, a, other, lams, repair_fn=fn)
            bl, ba = barriers(curve, "loss"), barriers(curve, "accuracy")
            mid = curve[(curve.lam == 0.5)].set_index("metric")["value"]
            row = {"pair": pair, "method": label, **{f"loss_{k}": v for k, v in bl.items()},
                   **{f"acc_{k}": v for k, v in ba.items()}, "loss_mid": float(mid["loss"]),
                   "acc_mid": float(mid["accuracy"]), "curve": curve.to_dict("list")}
            res["barriers"].append(row)
            log(f"pair {pair} {label}: loss max-over-path barrier {bl['path']:.4f}, "
                f"midpoint barrier {bl['midpoint']:.4f}; acc at 0.5 {row['acc_mid']:.4f}")
        res.setdefault("pair_times", []).append({"pair": pair, "wm_s": t_wm, "c2m3_2_s": t_c2,
                                                 "c2m3_2_iters": r2.iterations})
        save(res)

    # 2. merging N models ------------------------------------------------------------------------
    res["merge"] = []
    res["c2m3_runs"] = []
    runs = {}
    for n in range(3, args.models + 1):
        group = sds[:n]
        t0 = time.perf_counter()
        r = runs[n] = c2m3(group, spec, device=device)
        t_c = time.perf_counter() - t0
        res["c2m3_runs"].append({"n": n, "seconds": t_c, "iterations": r.iterations, "converged": r.converged,
                                 "relaxed_objective": r.objective[-1], "final_objective": r.final_objective})
        log(f"C2M3 on {n} models: {t_c:.1f} s, {r.iterations} Frank-Wolfe iterations")
        wm_aligned = [group[0]] + [apply_permutation(sd, spec, weight_matching(group[0], sd, spec, seed=0,
                                                                                device=device)) for sd in group[1:]]
        c2_aligned = [apply_permutation(sd, spec, r.pairwise(0, k)) for k, sd in enumerate(group)]
        candidates = {
            "naive averaging": (group, {k: sum(sd[k].float() for sd in group) / n for k in group[0]}),
            "weight matching to model 0": (wm_aligned, {k: sum(sd[k] for sd in wm_aligned) / n for k in group[0]}),
            "C2M3 (universe)": (c2_aligned, merge_in_universe(group, spec, r.perms, basis=0)),
        }
        for label, (ends, merged) in candidates.items():
            for with_repair in (False, True):
                sd = repair(merged, ends, layers, mlp_preactivations, x_rep, device=device) if with_repair else merged
                m = ev(sd)
                res["merge"].append({"n": n, "method": label, "repair": with_repair, **m})
                log(f"merge {n} {label}{' + REPAIR' if with_repair else ''}: acc {m['accuracy']:.4f} "
                    f"loss {m['loss']:.4f}")
        save(res)

    # C2M3 started from pairwise weight matching to model 0 instead of the identity, on all models
    t0 = time.perf_counter()
    rw = c2m3(sds, spec, init="weight_matching", device=device)
    t_w = time.perf_counter() - t0
    mw = ev(merge_in_universe(sds, spec, rw.perms, basis=0))
    res["c2m3_wm_init"] = {"n": args.models, "seconds": t_w, "iterations": rw.iterations, "converged": rw.converged,
                           "relaxed_objective": rw.objective[-1], "final_objective": rw.final_objective, **mw}
    log(f"C2M3 (init weight matching) on {args.models}: {t_w:.1f} s, {rw.iterations} iterations, acc "
        f"{mw['accuracy']:.4f}")
    save(res)

    # 3. cycle error: independent pairwise WM vs the maps of one C2M3 run on all models -----------
    r5 = runs[args.models]
    cyc3 = [(0, 1), (1, 2), (2, 0)]
    cyc5 = [(k, (k + 1) % args.models) for k in range(args.models)]
    res["cycle"] = []
    for name, cyc in (("3-cycle 0-1-2-0", cyc3), (f"{args.models}-cycle", cyc5)):
        wm_err = cycle_error([weight_matching(sds[i], sds[j], spec, seed=0, device=device) for i, j in cyc])
        c2_err = cycle_error([r5.pairwise(i, j) for i, j in cyc])
        res["cycle"].append({"cycle": name, "pairwise WM": wm_err, "C2M3": c2_err})
        log(f"cycle error {name}: WM {wm_err} C2M3 {c2_err}")
    save(res, final=True)
    log(f"wrote {out} and {out.with_suffix('.json')} ({res['meta']['total_s']:.0f} s)")
    return 0


def render(res: dict) -> str:
    m = res["meta"]
    L = ["# Permutation alignment on MNIST MLPs: measured results", "",
         f"- Command: `{m['command'].strip()}`", f"- Date: {m['date']}",
         f"- Device: {m['device']['name']} ({m['device']['device']}), torch {m['device']['torch']}, "
         f"{m['torch_threads']} torch threads; load average at the end {tuple(round(v, 1) for v in m['loadavg'])} "
         "(2 CPU cores shared with other jobs, so times are upper bounds)",
         f"- Models: {'-'.join(map(str, m.get('widths', WIDTHS)))} ReLU MLPs, {m['source']}",
         f"- Metrics on the MNIST test split (10,000 images); REPAIR statistics from the first "
         f"{m.get('repair_samples', 0):,} training images.",
         "- Linear assignments are solved by scipy on the CPU; everything else runs on the device above.",
         f"- Total run time {m['total_s']:.0f} s" + ("." if m.get("complete") else
                                                      " so far: **run incomplete**, sections below may be missing."), "", "## Individual models", "",
         "| seed | test accuracy | test loss |", "|---|---|---|"]
    L += [f"| {i} | {r['accuracy']:.4f} | {r['loss']:.4f} |" for i, r in enumerate(res["models"])]
    if "sanity" in res:
        sa = res["sanity"]
        L += ["", "## Known answer on the real models", "",
              f"Seed 0 and two randomly permuted copies of it: weight matching recovers the permutation exactly: "
              f"**{sa['wm_recovers']}**; C2M3 on the three recovers both exactly: **{sa['c2m3_recovers']}** "
              f"({sa['c2m3_iterations']} Frank-Wolfe iterations)."]
    L += ["", "## Test-loss barrier between two seeds", "",
          "Barrier definitions (analysis/barriers.py): *max-over-path* = max_λ [L(λ) − ((1−λ)L(0)+λL(1))]; "
          f"*midpoint* = L(½) − ½(L(0)+L(1)); λ on a grid of {m.get('lambdas', 11)} points. Accuracy barrier = "
          "max_λ of (linear interpolation of endpoint accuracies − accuracy(λ)). REPAIR resets each hidden unit's pre-activation mean/std at every interior λ to the "
          "(1−λ, λ) interpolation of the endpoints' statistics.", "",
          "| pair | method | loss: max-over-path barrier | loss: midpoint barrier | loss at λ=½ | accuracy at λ=½ | "
          "accuracy: max-over-path barrier |", "|---|---|---|---|---|---|---|"]
    L += [f"| {r['pair']} | {r['method']} | {r['loss_path']:.4f} | {r['loss_midpoint']:.4f} | "
          f"{r['loss_mid']:.4f} | {r['acc_mid']:.4f} | {r['acc_path']:.4f} |" for r in res.get("barriers", [])]
    L += ["", "| pair | weight matching (s) | C2M3, 2 models (s) | C2M3 iterations |", "|---|---|---|---|"]
    L += [f"| {t['pair']} | {t['wm_s']:.2f} | {t['c2m3_2_s']:.2f} | {t['c2m3_2_iters']} |" for t in res.get("pair_times", [])]
    L += ["", "## Merging N models (uniform average)", "",
          "Weight matching: models 1..N−1 each matched to model 0, then averaged. C2M3: averaged in the universe, "
          "mapped back to model 0's basis.", "",
          "| N | method | REPAIR | test accuracy | test loss |", "|---|---|---|---|---|"]
    L += [f"| {r['n']} | {r['method']} | {'yes' if r['repair'] else 'no'} | {r['accuracy']:.4f} | {r['loss']:.4f} |"
          for r in res.get("merge", [])]
    L += ["", "## Cycle error", "",
          "Fraction of hidden units that do not return to themselves around the cycle, per permutation group "
          "(h0, h1, h2 = the three hidden layers). Pairwise WM: each map computed independently (seed 0). "
          "C2M3: maps P_i^T P_j from one run on all models.", "",
          "| cycle | method | h0 | h1 | h2 |", "|---|---|---|---|---|"]
    for c in res.get("cycle", []):
        for meth in ("pairwise WM", "C2M3"):
            e = c[meth]
            L.append(f"| {c['cycle']} | {meth} | " + " | ".join(f"{e[g]:.4f}" for g in sorted(e)) + " |")
    L += ["", "## C2M3 time", "",
          "Frank-Wolfe from the identity (model 0's P fixed), exact line search, stop at relative gap 1e-6 or "
          "100 iterations; then projection to permutations.", "",
          "| N models | wall time (s) | iterations | converged | relaxed objective | objective after projection |",
          "|---|---|---|---|---|---|"]
    L += [f"| {r['n']} | {r['seconds']:.1f} | {r['iterations']} | {r['converged']} | {r['relaxed_objective']:.1f} | "
          f"{r['final_objective']:.1f} |" for r in res.get("c2m3_runs", [])]
    L += ["", "## How the methods are set up", "",
          "- **Weight matching** (Git Re-Basin): coordinate descent over the three hidden-unit groups in a random "
          "order (seed 0), one `scipy.optimize.linear_sum_assignment` per step on the summed similarity "
          "(incoming and outgoing weights and the bias), until a full sweep improves nothing.",
          "- **C2M3**: each model i has a doubly-stochastic P_i per group (model → universe); objective "
          "Σ_{i<j} Σ_params ⟨P_i·W_i, P_j·W_j⟩ (pairwise maps P_iᵀP_j); Frank-Wolfe on all P_i jointly: gradient, "
          "a linear assignment for the vertex, and an **exact line search** — along the step each model's "
          "universe weights are a polynomial of degree 2 in the step size, so the objective is a quartic whose "
          "coefficients we compute exactly and maximise on [0, 1]. Model 0's P is held at the identity (the "
          "objective is invariant to relabelling the universe; leaving it free made the first steps fight over "
          "that relabelling and failed to recover a permuted copy). Start: identity for every model. End: "
          "projection of each P_i to the nearest permutation (a linear assignment).",
          "- **Merging**: uniform average in the universe, mapped back to model 0's unit order.",
          "- **REPAIR**: per hidden unit, the merged model's pre-activation mean and standard deviation on the "
          "training images are reset to the weighted average of the (aligned) endpoints' statistics, folded "
          "into the Linear layer's weight rows and bias, layer by layer in forward order.",
          "- Cycle error: fraction of units i with (p_CA ∘ p_BC ∘ p_AB)(i) ≠ i around the cycle."]
    if "c2m3_wm_init" in res:
        w = res["c2m3_wm_init"]
        L += ["", f"Started instead from pairwise weight matching to model 0 (still cycle-consistent), C2M3 on "
              f"{w['n']} models took {w['seconds']:.1f} s for {w['iterations']} iterations (converged: "
              f"{w['converged']}), objective after projection {w['final_objective']:.1f}; merged test accuracy "
              f"{w['accuracy']:.4f}, loss {w['loss']:.4f} (no REPAIR). The wall time includes the weight matching."]
    dev = m["device"]["type"]
    L += ["", f"Measured on {dev.upper()}." + (" GPU: not measured — no GPU was lent to this task." if dev == "cpu"
                                               else ""), ""]
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
