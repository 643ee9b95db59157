"""Benchmark: all per-task SVD factors + the STI table, against the naive
per-task, per-layer torch.linalg.svd loop, in the same run.

    python benchmarks/spectra.py                 # ViT-B/32-shaped set, 12 blocks, T = 8
    python benchmarks/spectra.py --blocks 2      # smaller (CPU)
    python benchmarks/spectra.py --demo          # also the built-in demo set, if built
    python benchmarks/spectra.py --shape minilm  # synthetic set shaped like the demo backbone
    python benchmarks/spectra.py --first-look --keep auto --methods "" --skip-naive   # the app's first figure, default cache

Synthetic set: CLIP ViT-B/32 vision tower shapes, per block 2304×768 (qkv in),
768×768 (attn out), 3072×768 (mlp fc), 768×3072 (mlp proj); deltas are
Gaussian noise plus a rank-16 part (a decaying spectrum like a fine-tuning
delta). Prints wall and process-CPU seconds, the ratio naive / cache, the
reconstruction and orthogonality errors of the factors, and the time of a
rank-fraction change refreshing the STI table from cached factors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info, get_device  # noqa: E402
from analysis.interference import sti_table, sti_tables  # noqa: E402
from analysis.spectra import SpectralCache, as_matrix_batch, factor_errors  # noqa: E402
from analysis.taskvectors import TaskVectorSet, as_matrix  # noqa: E402

VIT_BLOCK = {"attn.in_proj_weight": (2304, 768), "attn.out_proj.weight": (768, 768),
             "mlp.c_fc.weight": (3072, 768), "mlp.c_proj.weight": (768, 3072)}
# all-MiniLM-L6-v2 (the demo backbone): 6 layers, hidden 384, intermediate 1536
MINILM_BLOCK = {"attention.self.query.weight": (384, 384), "attention.self.key.weight": (384, 384),
                "attention.self.value.weight": (384, 384), "attention.output.dense.weight": (384, 384),
                "intermediate.dense.weight": (1536, 384), "output.dense.weight": (384, 1536)}
SHAPES = {"vit": ("visual.transformer.resblocks", VIT_BLOCK, "ViT-B/32-shaped"),
          "minilm": ("encoder.layer", MINILM_BLOCK, "MiniLM-L6-shaped")}


def synthetic_set(blocks: int, tasks: int, seed: int = 0, shape: str = "vit") -> TaskVectorSet:
    g = torch.Generator().manual_seed(seed)
    prefix, block, _ = SHAPES[shape]
    base = {f"{prefix}.{b}.{p}": torch.zeros(size) for b in range(blocks) for p, size in block.items()}
    finetuned = {}
    for t in range(tasks):
        sd = {}
        for name, w in base.items():
            m, n = w.shape
            low = torch.randn(m, 16, generator=g) @ (torch.linspace(8, 1, 16).unsqueeze(1) * torch.randn(16, n, generator=g))
            sd[name] = 1e-3 * (torch.randn(m, n, generator=g) + low / 4)
        finetuned[f"task{t}"] = sd
    return TaskVectorSet.from_state_dicts(base, finetuned)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    _sync(device)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - w, time.process_time() - c


def naive_loop(tvs: TaskVectorSet, names, device):
    """What reference implementations do: one torch.linalg.svd per task per layer."""
    out = {}
    for name in names:
        per_task = [torch.linalg.svd(as_matrix(tvs.delta(task, name)).to(device), full_matrices=False)
                    for task in tvs.tasks]
        out[name] = tuple(torch.stack(x) for x in zip(*per_task))
    return out


class _Factors:
    """Minimal stand-in of SpectralCache over precomputed factors (for the naive STI)."""

    def __init__(self, tvs, factors):
        self.tvs, self._f, self.names, self.tasks = tvs, factors, list(factors), tvs.tasks

    def truncated(self, name, f):
        from analysis.spectra import truncation_rank
        u, s, vh = self._f[name]
        r = truncation_rank(s.shape[-1], f)
        return (u[..., :r], s[..., :r], vh[..., :r, :]), r


def errors(tvs, cache) -> tuple[float, float]:
    rec_max, orth_max = 0.0, 0.0
    for name in cache.names:
        a = as_matrix_batch(tvs.deltas(name)).to(cache.device)
        rec, orth = factor_errors(a, *cache.factors(name))
        rec_max, orth_max = max(rec_max, float(rec.max())), max(orth_max, float(orth.max()))
    return rec_max, orth_max


def run(label: str, tvs: TaskVectorSet, device: torch.device, methods, skip_naive: bool, rank_fraction: float,
        new_fraction: float, first_look: bool = False, keeps=()) -> dict:
    names = tvs.names_of_kind("matrix", "conv")
    shapes = sorted({tuple(as_matrix(torch.empty(tvs.shape(n), device="meta")).shape) for n in names})
    print(f"\n== {label}: T={len(tvs.tasks)} tasks, {len(names)} matrices, shapes {shapes}, device {device}")
    res = {"label": label, "tasks": len(tvs.tasks), "matrices": len(names), "device": str(device), "methods": {}}
    tvs.fingerprint(names)  # hash once up front: the disk-cache key is not part of the SVD timing
    if not skip_naive:
        naive, w, c = timed(lambda: naive_loop(tvs, names, device), device)
        _, ws, cs = timed(lambda: sti_table(tvs, rank_fraction, cache=_Factors(tvs, naive)), device)
        res["naive"] = {"factors_wall_s": w, "factors_cpu_s": c, "sti_wall_s": ws, "total_wall_s": w + ws}
        print(f"naive loop   factors {w:8.2f} s wall ({c:8.2f} s CPU)   + STI {ws:6.2f} s = {w + ws:8.2f} s")
        del naive
    if first_look:   # what the Spectra page draws first on a new set: one layer's singular values
        first = names[0]
        cache = SpectralCache(tvs, device=device, persist=False)
        _, w, c = timed(lambda: cache.first_look(first), device)
        res["first_look"] = {"name": first, "wall_s": w, "cpu_s": c}
        print(f"first look   {first}: singular values of its {len(tvs.tasks)} matrices {w:8.2f} s wall ({c:8.2f} s CPU)"
              " (the Spectra page's first figure on a new set)")
        del cache
    for keep in keeps:   # the app's default `keep` (top K of large matrices; analysis.spectra: keep)
        cache = SpectralCache(tvs, device=device, persist=False, keep=keep)
        _, w, c = timed(cache.compute, device)
        kept = sorted({cache.kept_rank(n) for n in names})
        res.setdefault("keep", {})[keep] = {"factors_wall_s": w, "factors_cpu_s": c, "kept": kept}
        print(f"cache[keep={keep}] (method {cache.method}) factors {w:8.2f} s wall ({c:8.2f} s CPU), "
              f"K kept per matrix {kept}")
        del cache
    for method in methods:
        cache = SpectralCache(tvs, device=device, persist=False, method=method, keep="full")   # errors() reads every triplet
        _, w, c = timed(cache.compute, device)
        _, ws, _ = timed(lambda: sti_table(tvs, rank_fraction, cache=cache), device)
        rec, orth = errors(tvs, cache)
        fallbacks = sum(r.get("fallbacks", 0) for r in cache.report)
        entry = {"factors_wall_s": w, "factors_cpu_s": c, "sti_wall_s": ws, "total_wall_s": w + ws,
                 "max_rel_reconstruction_error": rec, "max_orthogonality_error": orth, "fallbacks": fallbacks}
        line = (f"cache[{method:4s}]  factors {w:8.2f} s wall ({c:8.2f} s CPU)   + STI {ws:6.2f} s = {w + ws:8.2f} s"
                f"   rec.err {rec:.1e}  orth.err {orth:.1e}  fallbacks {fallbacks}")
        if "naive" in res:
            entry["speedup_vs_naive"] = res["naive"]["total_wall_s"] / (w + ws)
            line += f"   naive/cache = {entry['speedup_vs_naive']:.2f}x"
        print(line)
        # a rank-fraction change: STI (and the pair table) from cached factors only
        before = cache.compute_count
        _, wr, _ = timed(lambda: sti_table(tvs, new_fraction, cache=cache), device)
        _, wp, _ = timed(lambda: sti_tables(tvs, new_fraction, cache=cache), device)
        assert cache.compute_count == before
        entry.update(rank_change_sti_s=wr, rank_change_sti_and_pairwise_s=wp)
        print(f"             rank fraction {rank_fraction:g} -> {new_fraction:g}: STI table {wr * 1000:8.1f} ms, "
              f"STI + pairwise STI tables {wp * 1000:8.1f} ms (no SVD recomputed)")
        res["methods"][method] = entry
        del cache
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=None, help="blocks in the synthetic set (default 12 for vit, 6 for minilm)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="vit",
                   help="vit: CLIP ViT-B/32 vision tower; minilm: the demo backbone's shapes")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu / cuda (default: analysis.device.get_device())")
    p.add_argument("--methods", default="gram,svd", help="comma list of SpectralCache methods to time")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--demo", action="store_true", help="also time the built-in demo set (skipped if not built)")
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--rank-fraction", type=float, default=None, help="STI rank fraction (default 1/T)")
    p.add_argument("--new-rank-fraction", type=float, default=0.25)
    p.add_argument("--first-look", action="store_true",
                   help="also time the Spectra page's first figure on a new set (SpectralCache.first_look of one layer)")
    p.add_argument("--keep", default="", help="comma list of SpectralCache `keep` values to time compute() with "
                   "(e.g. auto: the app's default, top K of large matrices); the --methods runs keep every triplet")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives reproducible CPU seconds on a shared, loaded machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    info = device_info(device)
    print(f"device: {info['name']} ({info['device']}), torch {info['torch']}, threads {info['cpu_threads']}, "
          f"load average {os.getloadavg()}")
    methods = [m for m in args.methods.split(",") if m]
    results = {"device": info, "argv": sys.argv[1:], "runs": []}
    if not args.no_synthetic:
        blocks = args.blocks or (12 if args.shape == "vit" else 6)
        tvs = synthetic_set(blocks, args.tasks, shape=args.shape)
        f = args.rank_fraction or 1.0 / args.tasks
        results["runs"].append(run(f"{SHAPES[args.shape][2]} synthetic ({blocks} blocks)", tvs, device, methods,
                                   args.skip_naive, f, args.new_rank_fraction, args.first_look,
                                   [k for k in args.keep.split(",") if k]))
        del tvs
    if args.demo:
        try:
            from analysis.zoo import DemoNotBuilt, load_demo
            demo = load_demo()
        except (ImportError, DemoNotBuilt) as exc:
            print(f"\n== demo set skipped: {exc}")
        else:
            f = args.rank_fraction or 1.0 / len(demo.tvs.tasks)
            results["runs"].append(run("built-in demo", demo.tvs, device, methods, args.skip_naive, f,
                                       args.new_rank_fraction))
    print(f"\nload average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
