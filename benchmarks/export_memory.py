"""Memory of writing a merged model: streamed from the merge's sink, one shard at a time
(analysis.report.merged_model + write_hf_model), against the resident way (the MergeResult,
then tvs.apply's full state dict, then the write) in the same run.

    nice .venv/bin/python benchmarks/export_memory.py [--hidden 512] [--vocab 8000] [--layers 4,32] [--shard 16MB]

For each depth, builds a LLaMA-architecture set on disk in a temporary folder (random bf16
weights with the names and shapes of transformers' LlamaForCausalLM for the config, base + 2
tasks), then runs each way (task_arithmetic, α = 0.4) in its own process and samples that
process's anonymous resident memory (RssAnon: the heap, not the checkpoint pages mapped from
disk) every 2 ms. The children run with MALLOC_MMAP_THRESHOLD_=131072 so that glibc returns a
freed large tensor to the system at once (its default threshold grows after frees and keeps
them in the heap, which would hide what is actually held). Prints the model's size, the shard
limit and the peak increase over the process's memory after the set was opened. The streamed
peak should stay put as the model grows (one shard + the float32 work on the largest tensor);
the resident one grows with it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def build(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
    for name, scale in (("base", 0.0), ("code", 0.002), ("math", 0.004)):
        (folder / name).mkdir(parents=True)
        cfg.save_pretrained(folder / name)
        sd = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16) if scale else v
              for k, v in base.items()}
        save_file(sd, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() * v.element_size() for v in base.values())


def child(folder: Path, way: str, shard: str) -> dict:
    import torch
    from analysis.merging import merge
    from analysis.report import merged_model, write_hf_model
    from analysis.taskvectors import TaskVectorSet
    torch.set_num_threads(1)
    tvs = TaskVectorSet.from_checkpoints(folder / "base", {"code": folder / "code", "math": folder / "math"})
    start = rss_anon()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    out = folder / f"merged-{way}"
    if way == "stream":
        stream = merged_model(tvs, merge_into=lambda sink: merge(tvs, "task_arithmetic", alpha=0.4, sink=sink))
        write_hf_model(out, stream, folder / "base", max_shard_size=shard)
    else:
        state = tvs.apply(merge(tvs, "task_arithmetic", alpha=0.4))
        write_hf_model(out, state, folder / "base", max_shard_size=shard)
    seconds = time.perf_counter() - t0
    done.set()
    peak[0] = max(peak[0], rss_anon())
    meta = json.loads((out / "mergescope.json").read_text())
    return {"way": way, "peak_increase": peak[0] - start, "seconds": seconds, "files": len(meta["weights"]),
            "total_size": meta["total_size"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--layers", default="4,32", help="comma-separated depths")
    ap.add_argument("--shard", default="16MB")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "WAY"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.shard)))
        return
    import os
    from analysis.shards import parse_size
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    print(f"shard limit {args.shard} = {parse_size(args.shard) / 1e6:,.0f} MB; task_arithmetic over base + 2 tasks")
    print("| layers | model (bf16) | way | peak anonymous memory | × model | s | weight files |")
    print("|---|---|---|---|---|---|---|")
    for layers in [int(x) for x in args.layers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="mergescope-export-bench-") as tmp:
            size = build(Path(tmp), args.hidden, layers, args.vocab)
            rows = []
            for way in ("resident", "stream"):
                res = subprocess.run([sys.executable, __file__, "--shard", args.shard, "--child", tmp, way],
                                     capture_output=True, text=True, check=True, env=env)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            for r in rows:
                print(f"| {layers} | {size / 1e6:,.0f} MB | {r['way']} | +{r['peak_increase'] / 1e6:,.0f} MB | "
                      f"{r['peak_increase'] / size:.2f} | {r['seconds']:.1f} | {r['files']} |", flush=True)


if __name__ == "__main__":
    main()
