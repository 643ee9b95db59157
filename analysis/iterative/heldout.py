"""ColD Fusion's "better starting point" measurement, on tasks never fused.

For a backbone θ and a held-out task:
- linear probe: multinomial logistic regression on θ's frozen features of the
  train split (C chosen on validation; `analysis.zoo.train.train_probe`), scored
  on the evaluation split;
- short fine-tune: that probe as the frozen head, every backbone parameter
  trained for `steps` AdamW steps (the zoo's fine-tuning protocol), scored on
  the evaluation split with the same head.
The fine-tune's seed depends on the task only, so across rounds (and against
the original backbone) only the starting point differs.
"""
from __future__ import annotations

from typing import Mapping

import torch

from analysis.evaluation import Evaluator, Head
from analysis.iterative.config import IterativeConfig, round_seed
from analysis.iterative.training import seeded_finetune


def _accuracy(features: torch.Tensor, labels: torch.Tensor, head: Head) -> float:
    logits = features @ head.weight.float().T.cpu() + head.bias.float().cpu()
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def heldout_scores(evaluator: Evaluator, state: Mapping[str, torch.Tensor], task: str,
                   config: IterativeConfig) -> dict[str, float]:
    """{"heldout_probe_accuracy": .., "heldout_finetune_accuracy": ..} of backbone `state` on `task`."""
    from analysis.zoo.train import extract_features, train_probe

    device = evaluator.device
    data = evaluator.data[task]
    backbone = evaluator.backbone_copy()
    backbone.load_state_dict(dict(state))
    feats = {s: extract_features(backbone, data[s], device) for s in ("train", "validation", config.eval_split)}
    n_classes = int(evaluator.heads[task].weight.shape[0])
    head, _ = train_probe(feats["train"], data["train"].labels, feats["validation"], data["validation"].labels,
                          n_classes, list(evaluator.heads[task].labels) or [str(c) for c in range(n_classes)],
                          seed=config.seed)
    out = {"heldout_probe_accuracy": _accuracy(feats[config.eval_split], data[config.eval_split].labels, head)}
    if config.heldout_steps > 0:
        seeded_finetune(backbone, head, data["train"], device, config.heldout_steps, config,
                        round_seed(config.seed, f"heldout:{task}", 0))
        tuned = extract_features(backbone, data[config.eval_split], device)
        out["heldout_finetune_accuracy"] = _accuracy(tuned, data[config.eval_split].labels, head)
    return out
