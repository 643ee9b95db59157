"""One seeded fine-tune of a backbone copy: the zoo's protocol, made reproducible.

`analysis.zoo.train.finetune` seeds its batch order; dropout draws from torch's
global generator, so it is seeded here too (inside `fork_rng`, leaving the
caller's generator as it was). Same state + same seed -> the same weights.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from analysis.evaluation import Evaluator, Head, Split


def seeded_finetune(backbone: nn.Module, head: Head, train: Split, device: torch.device, steps: int, config,
                    seed: int) -> nn.Module:
    """Fine-tune `backbone` in place for `steps` steps (head frozen); returns it."""
    from analysis.zoo.train import finetune

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        finetune(backbone, head, train, device, steps, config.lr, config.batch_size, seed,
                 config.weight_decay, config.warmup)
    return backbone


def finetune_from(evaluator: Evaluator, state: Mapping[str, torch.Tensor], task: str, steps: int, config,
                  seed: int) -> dict[str, torch.Tensor]:
    """State dict (CPU) of a copy of the evaluator's backbone, loaded with `state`,
    fine-tuned on `task`'s train split with the task's frozen head."""
    backbone = evaluator.backbone_copy()
    backbone.load_state_dict(dict(state))
    head = evaluator.heads[task]
    seeded_finetune(backbone, head, evaluator.data[task]["train"], evaluator.device, steps, config, seed)
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
