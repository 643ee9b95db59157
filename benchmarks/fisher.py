"""Diagonal empirical Fisher: the one-example loop against the chunked vmap route.

Builds a randomly initialised BERT shaped like all-MiniLM-L6-v2 (hidden 384,
6 layers, 12 heads, intermediate 1536, 30 522-token vocabulary: 22.6 M
parameters; no download), random token data of --min-len..--max-len tokens
(padded to --max-len, right padding, like the zoo's encoded splits) and a
random 3-class head, then times `Evaluator.fisher_diagonal` over every
parameter with `fast_grads=False` (one example at a time, the reference) and
`fast_grads=True` (vmap over chunks of --chunk-mib MiB of per-example
gradients, the route check against the loop included), in the same run.

Prints both times (median over --repeat), the ratio (and, with repeats, the
ratio of each repeat's pair, a steadier figure on a shared machine), and the difference of
the two Fishers: per tensor, max |fast - loop| / max |loop|, the largest over
tensors whose loop Fisher is not zero up to rounding (attention key biases
have a zero gradient in exact arithmetic: their float32 values are noise), and
max |fast - loop| over all tensors relative to the largest Fisher entry.

    OMP_NUM_THREADS=1 python benchmarks/fisher.py --threads 1          # 64 examples, 32-64 tokens
    python benchmarks/fisher.py --n 16 --layers 2                       # quick look
    python benchmarks/fisher.py --device cuda --n 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.device import device_info, get_device  # noqa: E402
from analysis.evaluation import EncodedSplit, Evaluator, Head  # noqa: E402


def minilm_shaped(layers: int, seed: int):
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
    return BertModel(cfg, add_pooling_layer=False).eval(), cfg


def token_split(n: int, min_len: int, max_len: int, vocab: int, classes: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    ids = torch.randint(1000, vocab, (n, max_len), generator=g)
    ids[:, 0], mask = 101, (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids[torch.arange(n), lengths - 1] = 102
    ids[:, 3] = ids[:, 7]  # a repeated token in every example
    ids = ids * mask  # [PAD] = 0
    return EncodedSplit(ids, mask, torch.randint(0, classes, (n,), generator=g))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fast: dict, loop: dict) -> dict:
    scale = max(float(v.abs().max()) for v in loop.values())
    per_tensor, noise = {}, []
    for k, ref in loop.items():
        err, peak = float((fast[k] - ref).abs().max()), float(ref.abs().max())
        if peak > 1e-6 * scale:
            per_tensor[k] = err / peak
        else:
            noise.append(k)
    worst = max(per_tensor, key=per_tensor.get)
    return {"max_rel_diff": per_tensor[worst], "worst_tensor": worst,
            "max_abs_diff_over_max": max(float((fast[k] - loop[k]).abs().max()) for k in loop) / scale,
            "rounding_only_tensors": len(noise)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=64, help="examples")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--chunk-mib", type=float, default=None, help="vmap chunk budget (default: the Evaluator's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    info = device_info(device)
    backbone, cfg = minilm_shaped(args.layers, args.seed)
    n_params = sum(p.numel() for p in backbone.parameters())
    split = token_split(args.n, args.min_len, args.max_len, cfg.vocab_size, 3, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    head = Head(torch.randn(3, cfg.hidden_size, generator=g) * 0.1, torch.zeros(3))
    kwargs = {} if args.chunk_mib is None else {"grad_chunk_bytes": int(args.chunk_mib * 2**20)}
    ev = Evaluator(backbone, {"bench": {"train": split}}, {"bench": head}, device=device, **kwargs)
    print(f"device: {info['name']} ({device}), torch {info['torch']}, threads {torch.get_num_threads()}")
    print(f"model: random BERT, hidden 384, {args.layers} layers, {n_params / 1e6:.1f} M parameters; "
          f"data: {args.n} examples of {args.min_len}-{args.max_len} tokens "
          f"(mean {float(split.lengths().float().mean()):.1f}); chunk budget {ev.grad_chunk_bytes / 2**20:.0f} MiB")

    results, times = {}, {"loop": [], "fast": []}
    for _ in range(args.repeat):
        for label, fast in (("loop", False), ("fast", True)):
            ev.fast_grads = fast
            ev._grad_routes.clear()  # the route check is part of the fast time
            sync(device)
            t = time.perf_counter()
            results[label] = ev.fisher_diagonal("bench", n=None)
            sync(device)
            times[label].append(time.perf_counter() - t)
            print(f"  {label}: {times[label][-1]:.2f} s", flush=True)
    route = next(iter(ev._grad_routes.values()), None)  # the one route check of the fast run
    loop_s, fast_s = statistics.median(times["loop"]), statistics.median(times["fast"])
    paired = [a / b for a, b in zip(times["loop"], times["fast"])]  # each repeat: loop, then fast
    diff = compare(results["fast"], results["loop"])
    print(f"fast route: {route if route is not None else 'one-example loop (vmap unavailable)'}")
    print(f"loop {loop_s:.2f} s ({1e3 * loop_s / args.n:.0f} ms/example), fast {fast_s:.2f} s "
          f"({1e3 * fast_s / args.n:.0f} ms/example): loop / fast = {loop_s / fast_s:.2f}x"
          + (f" (per repeat: {', '.join(f'{r:.2f}' for r in paired)}; median {statistics.median(paired):.2f}x)"
             if args.repeat > 1 else ""))
    print(f"max relative difference (per tensor, max|fast-loop| / max|loop|): {diff['max_rel_diff']:.1e} "
          f"({diff['worst_tensor']}); over all tensors / largest entry: {diff['max_abs_diff_over_max']:.1e}; "
          f"{diff['rounding_only_tensors']} tensors are zero up to rounding")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info, "args": vars(args), "times_s": times, "paired": paired,
                                               "route": str(route), **diff}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
