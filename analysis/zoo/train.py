"""The protocol: a linear probe on the frozen backbone ("zero-shot" head), then
full-backbone fine-tuning with that head frozen.

Heads are trained once per task, on pretrained features, and never change
afterwards; task vector = fine-tuned backbone - pretrained backbone.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from analysis.evaluation import EncodedSplit, Head, Split, _to, features
from analysis.zoo.data import TaskData

Progress = Callable[[float, str], None]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to `max_length`, from either tokenizer kind."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "index"):  # our WordTokenizer
        return tokenizer.encode(texts, max_length)
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def encode_task(tokenizer, task: TaskData, max_length: int) -> dict[str, EncodedSplit]:
    out = {}
    for split, (texts, labels) in task.splits.items():
        ids, mask = encode_texts(tokenizer, texts, max_length)
        width = max(int(mask.sum(1).max()) if len(texts) else 1, 1)  # drop all-padding columns
        out[split] = EncodedSplit(ids[:, :width].contiguous(), mask[:, :width].contiguous(),
                                  torch.as_tensor(labels, dtype=torch.long))
    return out


@torch.no_grad()
def extract_features(backbone: nn.Module, data: Split, device: torch.device, batch_size: int = 64,
                     params: dict | None = None) -> torch.Tensor:
    """Pooled features (N, H) of every example of `data`, in data order (any split kind:
    token data or tensor features); `params` swaps in backbone tensors (functional_call)."""
    backbone.eval()
    order = torch.argsort(data.lengths(), descending=True, stable=True)  # batch similar lengths
    feats = []
    for start in range(0, len(data), batch_size):
        inputs, _ = data.batch(order[start:start + batch_size])
        feats.append(features(backbone, _to(inputs, device), params).float().cpu())
    if not feats:
        return torch.zeros(0, 0)
    return torch.cat(feats)[torch.argsort(order)]  # back to data order


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                n_classes: int, label_names: Sequence[str], Cs: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
                seed: int = 0) -> tuple[Head, dict]:
    """Multinomial logistic regression on frozen features; C chosen on validation.

    A binary sklearn model (one weight row w, bias b) is written as the
    equivalent two-class softmax head: logits [0, w.x + b].
    """
    from sklearn.linear_model import LogisticRegression

    xtr, ytr = train_x.double().numpy(), train_y.numpy()
    xva, yva = val_x.double().numpy(), val_y.numpy()
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
        clf.fit(xtr, ytr)
        acc = float((clf.predict(xva) == yva).mean()) if len(yva) else 0.0
        if best is None or acc > best[0]:
            best = (acc, C, clf)
    acc, C, clf = best
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    full_w = torch.zeros(n_classes, coef.shape[1])
    full_b = torch.zeros(n_classes)
    classes = [int(c) for c in clf.classes_]
    if coef.shape[0] == 1:  # binary: class_[1] vs class_[0]
        full_w[classes[1]], full_b[classes[1]] = coef[0], bias[0]
    else:
        for row, c in enumerate(classes):
            full_w[c], full_b[c] = coef[row], bias[row]
    return Head(full_w, full_b, list(label_names)), {"probe_C": C, "probe_val_accuracy": acc}


def _length_bucketed_batches(lengths: torch.Tensor, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: shuffle, sort chunks of 8 batches by length, cut, shuffle the batches.

    Batches hold texts of similar length, so padding to the longest in a batch
    wastes little compute (short SMS and long outliers no longer share a batch).
    """
    order = torch.randperm(len(lengths), generator=g)
    chunk = batch_size * 8
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches += [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    if not batches:  # fewer examples than one batch
        batches = [order]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


class _Classifier(nn.Module):
    """Backbone + pooling + a frozen linear head."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            self.head.bias.copy_(head.bias)
        self.head.requires_grad_(False)

    def forward(self, inputs):
        return self.head(features(self.backbone, inputs))


def finetune(backbone: nn.Module, head: Head, train: Split, device: torch.device, steps: int,
             lr: float, batch_size: int, seed: int, weight_decay: float = 0.01, warmup: float = 0.1,
             progress: Progress | None = None) -> dict:
    """Train every backbone parameter for `steps` AdamW steps; the head stays frozen.

    Batches cycle through seeded, length-bucketed epochs of the training set; the learning
    rate warms up linearly, then decays linearly to zero.
    """
    model = _Classifier(backbone, head).to(device)
    params = [p for p in model.backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    assert not any(p.requires_grad for p in model.head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))
    g = torch.Generator().manual_seed(seed)
    lengths = train.lengths()
    batches: list[torch.Tensor] = []
    losses = []
    model.train()
    for step in range(steps):
        if not batches:
            batches = _length_bucketed_batches(lengths, batch_size, g)
        b = batches.pop()
        inputs, _ = train.batch(b)   # token data cut to the batch's longest row
        logits = model(_to(inputs, device))
        loss = nn.functional.cross_entropy(logits, train.labels[b].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 10 == 0 or step == steps - 1):
            progress((step + 1) / steps, f"step {step + 1}/{steps}, loss {np.mean(losses[-10:]):.3f}")
    model.eval()
    backbone.requires_grad_(False)
    head_after = Head(model.head.weight.detach().cpu().clone(), model.head.bias.detach().cpu().clone(), head.labels)
    return {"train_loss_first": losses[0] if losses else math.nan,
            "train_loss_last10": float(np.mean(losses[-10:])) if losses else math.nan,
            "head_after": head_after}
