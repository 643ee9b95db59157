"""Label-free comparisons of a merged model with each fine-tuned model, for sets without labels.

- On unlabelled text (`compare_on_text`), for each task t, merged model M_t (the shared merge, or
  task t's own model for per-task methods) against the fine-tuned model F_t:
  * prediction agreement: the fraction of texts where argmax head_t(M_t(x)) = argmax head_t(F_t(x))
    (only where the task has a head from its checkpoint); 1 = the merge decides like F_t;
  * mean cosine of the pooled features M_t(x) and F_t(x), text by text;
  * linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited",
    eq. for the linear kernel): ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F) with X̃, Ỹ the column-centred
    feature matrices; invariant to rotations and isotropic scaling of either representation.
- In weight space, needing nothing but the checkpoints (`layer_distances`), per task and block:
  relative distance ‖δ − τ_t‖ / ‖τ_t‖ (0: the merge equals the fine-tuned model there; 1: as far
  as the base) and the cosine between the merged delta δ and τ_t.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd
import torch
from torch import nn

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.evaluation import EncodedSplit, Head, backbone_lock, features

OUTSIDE = "outside blocks"


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples, (n, p) and (n, q)."""
    if x.shape[0] != y.shape[0]:
        raise ValidationError(f"CKA needs the same examples on both sides: {x.shape[0]} rows vs {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValidationError(f"CKA needs at least 2 examples, got {x.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.T @ x).norm() ** 2
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over examples of cos(x_i, y_i)."""
    return float(nn.functional.cosine_similarity(x.double(), y.double(), dim=1).mean())


def _concat(splits: list[EncodedSplit]) -> EncodedSplit:
    width = max(int(s.input_ids.shape[1]) for s in splits)
    pad = lambda t: nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731 -- padding is on the right
    return EncodedSplit(torch.cat([pad(s.input_ids) for s in splits]), torch.cat([pad(s.attention_mask) for s in splits]),
                        torch.cat([s.labels for s in splits]))


class TextProbe:
    """Runs a backbone, with parameters swapped in, on each task's unlabelled texts.

    `texts`: {task: EncodedSplit} (labels ignored); a task of the set without texts of its own is
    compared on all the texts given. `heads`: the tasks' heads where known (prediction agreement)."""

    def __init__(self, backbone: nn.Module, texts: Mapping[str, EncodedSplit], heads: Mapping[str, Head] | None = None,
                 device=None, batch_size: int = 64):
        if not texts:
            raise ValidationError("a TextProbe needs unlabelled text for at least one task")
        self.device = get_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.texts = dict(texts)
        self.all_texts = _concat(list(self.texts.values()))
        self.heads = {t: Head(h.weight.float().to(self.device), h.bias.float().to(self.device), list(h.labels))
                      for t, h in (heads or {}).items()}
        self.batch_size = int(batch_size)

    def texts_for(self, task: str) -> tuple[EncodedSplit, str]:
        if task in self.texts:
            return self.texts[task], "its own texts"
        return self.all_texts, "all unlabelled texts"

    @torch.no_grad()
    def features(self, data: EncodedSplit, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """Pooled features (N, H) in data order, on the CPU."""
        order = torch.argsort(data.lengths(), descending=True, stable=True)
        out = []
        for start in range(0, len(data), self.batch_size):
            inputs, _ = data.batch(order[start:start + self.batch_size])
            out.append(features(self.backbone, {k: v.to(self.device) for k, v in inputs.items()}, params).float().cpu())
        return torch.cat(out)[torch.argsort(order)]

    def predictions(self, task: str, feats: torch.Tensor) -> torch.Tensor | None:
        head = self.heads.get(task)
        if head is None:
            return None
        return (feats.to(self.device) @ head.weight.T + head.bias).argmax(1).cpu()

    def params(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """base + delta, on the device."""
        with backbone_lock(self.backbone):   # not while another thread has its tensors swapped in
            base = self.backbone.state_dict()
        return {n: base[n].float() + d.to(self.device, torch.float32) for n, d in delta.items()}


def compare_on_text(probe: TextProbe, tvs, result) -> pd.DataFrame:
    """task, texts, text source, prediction_agreement (NaN without a head), mean_cosine, linear_cka."""
    from analysis.merging.scoring import as_result
    result = as_result(result, tvs.tasks)
    rows = []
    for task in tvs.tasks:
        data, source = probe.texts_for(task)
        merged = probe.features(data, probe.params(result.for_task(task)))
        tuned = probe.features(data, probe.params(tvs.task_vector(task)))
        pm, pf = probe.predictions(task, merged), probe.predictions(task, tuned)
        agree = float((pm == pf).double().mean()) if pm is not None else float("nan")
        rows.append({"task": task, "texts": len(data), "text source": source, "prediction_agreement": agree,
                     "mean_cosine": mean_cosine(merged, tuned),
                     "linear_cka": linear_cka(merged, tuned) if len(data) >= 2 else float("nan")})
    return pd.DataFrame(rows, columns=["task", "texts", "text source", "prediction_agreement", "mean_cosine",
                                       "linear_cka"])


def layer_distances(tvs, result) -> pd.DataFrame:
    """task, depth (block index, or "outside blocks"), parameters, distance ‖δ − τ_t‖, task_vector_norm ‖τ_t‖,
    relative_distance, cosine (see the module docstring)."""
    from analysis.merging.scoring import as_result
    result = as_result(result, tvs.tasks)
    sums: dict[tuple[str, object], list[float]] = {}
    for name in tvs.param_names:
        stacked = tvs.deltas(name)
        depth = tvs.depth(name)
        key_depth = OUTSIDE if depth is None else depth
        for t, task in enumerate(tvs.tasks):
            tau = stacked[t].double()
            d = result.for_task(task)[name].to(tau.device, torch.float64)
            acc = sums.setdefault((task, key_depth), [0.0, 0.0, 0.0, 0.0, 0])
            acc[0] += float(((d - tau) ** 2).sum())
            acc[1] += float((tau ** 2).sum())
            acc[2] += float((d * tau).sum())
            acc[3] += float((d ** 2).sum())
            acc[4] += d.numel()
    rows = []
    for (task, depth), (diff, tau2, dot, d2, n) in sums.items():
        rows.append({"task": task, "depth": depth, "parameters": int(n), "distance": diff ** 0.5,
                     "task_vector_norm": tau2 ** 0.5,
                     "relative_distance": (diff / tau2) ** 0.5 if tau2 > 0 else float("nan"),
                     "cosine": dot / (d2 * tau2) ** 0.5 if d2 > 0 and tau2 > 0 else float("nan")})
    df = pd.DataFrame(rows, columns=["task", "depth", "parameters", "distance", "task_vector_norm",
                                     "relative_distance", "cosine"])
    df["_task"] = df["task"].map(tvs.tasks.index)
    df["_depth"] = df["depth"].map(lambda d: -1 if d == OUTSIDE else d)  # embeddings, pooler: first
    return df.sort_values(["_task", "_depth"], kind="stable").drop(columns=["_task", "_depth"]).reset_index(drop=True)


def overall_distance(layers: pd.DataFrame) -> pd.Series:
    """task -> ‖δ − τ_t‖ / ‖τ_t‖ over all parameters, from `layer_distances`' per-block sums."""
    g = layers.groupby("task", sort=False)
    return (g["distance"].apply(lambda d: float((d ** 2).sum()) ** 0.5)
            / g["task_vector_norm"].apply(lambda d: float((d ** 2).sum()) ** 0.5))
