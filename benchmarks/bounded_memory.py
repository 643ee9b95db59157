"""Peak memory of the two whole-model steps issue 17 bounded, on this machine (CPU).

A synthetic LLaMA-shaped set is written to disk (base + T fine-tuned
safetensors files, float32, `--blocks` blocks of q/k/v/o (d × d) and
gate/up/down (d × f, f × d) projections) and opened as a streaming
TaskVectorSet (nothing resident). Each measurement runs in a fresh process.
Two figures, each over its value after opening the set: the peak RSS
(`ru_maxrss`, which also counts the checkpoint pages the memory-mapped
safetensors reads bring in: file-backed, reclaimable, the same for both
variants), and the peak anonymous RSS (`RssAnon` of /proc/self/status,
sampled every 2 ms by a thread: the memory the process itself allocated).

1. TIES' whole-model top-k thresholds (density 0.2): the old code's
   concatenation of every task's magnitudes + kthvalue (baseline), against
   the streaming radix selection (`analysis.merging.topk`). Both must agree
   bit for bit (checked).
2. SpectralCache.compute: keep="full" (baseline) against keep="auto" (top
   K = ⌊max(0.25, 1/T)·k⌋ directions for rank > 512): bytes of the kept
   factors and peak RSS.

    python benchmarks/bounded_memory.py                          # d=1024, f=2816, 2 blocks, T=4
    python benchmarks/bounded_memory.py --blocks 4 --d 2048 --f 5632
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shapes(blocks: int, d: int, f: int) -> dict[str, tuple[int, int]]:
    out = {}
    for b in range(blocks):
        p = f"model.layers.{b}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                    p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)})
    return out


def write_set(folder: Path, tasks: int, blocks: int, d: int, f: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes(blocks, d, f).items()}
    save_file(base, str(folder / "base.safetensors"))
    for t in range(tasks):
        save_file({k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()},
                  str(folder / f"task{t}.safetensors"))


def _open(folder: Path, tasks: int):
    from analysis.taskvectors import TaskVectorSet
    return TaskVectorSet.from_checkpoints(folder / "base.safetensors",
                                          {f"task{t}": folder / f"task{t}.safetensors" for t in range(tasks)})


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class AnonPeak:
    """Peak RssAnon while inside, sampled every 2 ms."""

    def __enter__(self):
        self.peak, self._stop = _status_mib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_mib("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_mib("RssAnon"))


def child(step: str, folder: Path, tasks: int) -> dict:
    tvs = _open(folder, tasks)
    before, anon_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _status_mib("RssAnon")
    t0 = time.perf_counter()
    out: dict = {}
    with AnonPeak() as anon:
        _step(step, tvs, tasks, out)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_over_open_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    out["anon_peak_over_open_mib"] = anon.peak - anon_before
    return out


def _step(step: str, tvs, tasks: int, out: dict) -> None:
    if step in ("concatenated", "streamed"):
        from analysis.merging.ties import topk_thresholds
        from analysis.merging.topk import streaming_thresholds
        get = lambda n: tvs.deltas(n).float()   # noqa: E731
        if step == "concatenated":
            thr = topk_thresholds(torch.cat([get(n).abs().reshape(tasks, -1) for n in tvs.param_names], 1), 0.2)
        else:
            thr = streaming_thresholds(get, tvs.param_names, tasks, 0.2)
        out["thresholds"] = thr.tolist()
    else:
        from analysis.spectra import SpectralCache
        cache = SpectralCache(tvs, device="cpu", persist=False, keep=step.split("=")[1]).compute()
        out["factor_bytes"] = sum(t.numel() * t.element_size() for f in cache._all().values() for t in f)
        out["kept"] = {n.rsplit(".", 2)[-2]: cache.kept_rank(n) for n in cache.names[:7]}


def run_child(step: str, folder: Path, tasks: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", step, "--folder", str(folder), "--tasks", str(tasks)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--f", type=int, default=2816)
    ap.add_argument("--child")
    ap.add_argument("--folder")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.tasks)))
        return
    n = sum(a * b for a, b in shapes(args.blocks, args.d, args.f).values())
    print(f"set: T={args.tasks}, {args.blocks} LLaMA-shaped blocks (d={args.d}, f={args.f}), {n / 1e6:.1f} M "
          f"entries per model; T x N float32 = {4 * args.tasks * n / 2**20:.0f} MiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="ms-bounded-") as d:
        folder = Path(d)
        write_set(folder, args.tasks, args.blocks, args.d, args.f)
        print("\n1. TIES whole-model thresholds (density 0.2), peaks over the opened set")
        old, new = run_child("concatenated", folder, args.tasks), run_child("streamed", folder, args.tasks)
        assert old["thresholds"] == new["thresholds"], (old["thresholds"], new["thresholds"])
        for label, r in (("concatenated (before)", old), ("streamed (after)", new)):
            print(f"  {label:22s} anon peak +{r['anon_peak_over_open_mib']:8.1f} MiB   "
                  f"RSS peak +{r['peak_over_open_mib']:8.1f} MiB   {r['wall_s']:7.2f} s")
        print(f"  ratio after/before: anon peak {_ratio(new, old, 'anon_peak_over_open_mib')}, "
              f"RSS peak {_ratio(new, old, 'peak_over_open_mib')}, time {new['wall_s'] / old['wall_s']:.2f}"
              f"   (thresholds identical: {new['thresholds']})")
        print("\n2. SpectralCache.compute, kept factors and peaks over the opened set")
        full, auto = run_child("keep=full", folder, args.tasks), run_child("keep=auto", folder, args.tasks)
        for label, r in (("keep='full' (before)", full), ("keep='auto' (after)", auto)):
            print(f"  {label:22s} factors {r['factor_bytes'] / 2**20:8.1f} MiB   anon peak "
                  f"+{r['anon_peak_over_open_mib']:8.1f} MiB   RSS peak +{r['peak_over_open_mib']:8.1f} MiB   "
                  f"{r['wall_s']:7.2f} s   K {r['kept']}")
        print(f"  ratio after/before: factors {auto['factor_bytes'] / full['factor_bytes']:.3f}, "
              f"anon peak {_ratio(auto, full, 'anon_peak_over_open_mib')}, "
              f"RSS peak {_ratio(auto, full, 'peak_over_open_mib')}")


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.3f}" if b[key] > 0 else "n/a"


if __name__ == "__main__":
    main()
