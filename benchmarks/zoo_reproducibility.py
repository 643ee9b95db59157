"""Is the demo's fine-tuning reproducible? `analysis.zoo.train.finetune` on a tiny BERT (dropout 0.1, as
MiniLM), same seed, four runs in fresh processes:
  1 thread (twice), 2 threads, and 1 thread after the global torch generator was advanced (as an earlier
  task of the same build process does).
Prints a hash and the sum of the fine-tuned weights per run. Explains why rebuilds of one quick-build
configuration score differently (README, "Which numbers the app shows").

    python benchmarks/zoo_reproducibility.py
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(threads: int, consume: int) -> str:
    import torch
    from transformers import BertConfig, BertModel

    from analysis.evaluation import Head
    from analysis.zoo.toy import TOY_TASKS, WordTokenizer, toy_task, toy_vocab
    from analysis.zoo.train import encode_task, finetune
    torch.set_num_threads(threads)
    tok = WordTokenizer(toy_vocab())
    task = toy_task(next(iter(TOY_TASKS)), 200, 0)
    data = encode_task(tok, task, 32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg, add_pooling_layer=False)
    g = torch.Generator().manual_seed(1)
    k = len(task.label_names)
    head = Head(torch.randn(k, 64, generator=g), torch.zeros(k), task.label_names)
    torch.rand(consume)   # what an earlier task of the same build process leaves behind
    finetune(model, head, data["train"], torch.device("cpu"), 30, 1e-3, 16, seed=0)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (f"threads={threads} generator advanced by {consume}: "
            f"sha256 {hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:12]}, sum {flat.double().sum().item():.10f}")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(one_run(int(sys.argv[1]), int(sys.argv[2])))
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
        for threads, consume in ((1, 0), (1, 0), (2, 0), (1, 1000)):
            out = subprocess.run([sys.executable, __file__, str(threads), str(consume)], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)
