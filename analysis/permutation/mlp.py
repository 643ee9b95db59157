"""A ReLU MLP as a pure function of its state dict (any chain of Linear layers,
e.g. the MNIST models' `layers.{i}.weight/bias`), so aligned, interpolated and
merged parameter sets can be scored without building modules."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from analysis.device import get_device
from analysis.permutation.specs import StateDict, linear_chain_names

Tensor = torch.Tensor


def mlp_forward(sd: StateDict, x: Tensor, return_preacts: bool = False):
    """Logits of the MLP; with `return_preacts`, also the hidden layers'
    pre-activations (what REPAIR renormalises)."""
    names = linear_chain_names(sd)
    h = x.flatten(1)
    pre = []
    for l, n in enumerate(names):
        h = F.linear(h, sd[f"{n}.weight"], sd.get(f"{n}.bias"))
        if l < len(names) - 1:
            pre.append(h)
            h = torch.relu(h)
    return (h, pre) if return_preacts else h


@torch.no_grad()
def mlp_layer_features(sd: StateDict, x: Tensor) -> dict[str, Tensor]:
    """Per hidden layer, its activations after the ReLU (`layer 1`, ...), and
    the logits (`output`): the latent spaces the Alignment page compares."""
    logits, pre = mlp_forward({k: v.float() for k, v in sd.items()}, x, return_preacts=True)
    out = {f"layer {l + 1}": torch.relu(p) for l, p in enumerate(pre)}
    out["output"] = logits
    return out


def mlp_group_features(sd: StateDict, x: Tensor) -> dict[str, list[Tensor]]:
    """For activation matching with `mlp_spec`: group h{l} is hidden layer l's
    units, read after the ReLU."""
    return {f"h{l}": [torch.relu(p)] for l, p in enumerate(mlp_preactivations(sd, x))}


def mlp_preactivations(sd: StateDict, x: Tensor) -> list[Tensor]:
    return mlp_forward(sd, x, return_preacts=True)[1]


def mlp_repair_layers(sd: StateDict) -> list[tuple[str, str]]:
    """(weight, bias) names of the hidden Linear layers, in forward order."""
    names = linear_chain_names(sd)[:-1]
    return [(f"{n}.weight", f"{n}.bias") for n in names]


@torch.no_grad()
def evaluate_mlp(sd: StateDict, x: Tensor, y: Tensor, batch_size: int = 8192,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the MLP on (x, y)."""
    device = get_device(device)
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}
    loss, correct = 0.0, 0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        out = mlp_forward(params, xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return {"loss": loss / len(x), "accuracy": correct / len(x)}


class MLPEvaluator:
    """`evaluate_mlp` on fixed examples (x, y), as an eval function (sd -> {loss, accuracy}), plus
    `along(sd_a, sd_b, lambdas)`: every point of the straight path (1 − λ)·A + λ·B at once. The
    first layer's pre-activations are linear in λ, (1 − λ)·(W_a x + b_a) + λ·(W_b x + b_b), so
    the two ends' are computed once and each point pays only for the layers after it (on the demo
    MLP 784-512-512-512-10 the first layer is 43 % of a forward pass). Equal to evaluating each
    interpolated model to float32 rounding (tests)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int = 8192, device: str | torch.device | None = None):
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, get_device(device)

    def __call__(self, sd: StateDict) -> dict[str, float]:
        return evaluate_mlp(sd, self.x, self.y, self.batch_size, self.device)

    @torch.no_grad()
    def along(self, sd_a: StateDict, sd_b: StateDict, lambdas) -> list[dict[str, float]]:
        a = {k: v.to(device=self.device, dtype=torch.float32) for k, v in sd_a.items()}
        b = {k: v.to(device=self.device, dtype=torch.float32) for k, v in sd_b.items()}
        names = linear_chain_names(a)
        rest = [[k for k in a if k.startswith(f"{n}.")] for n in names[1:]]
        points = [(float(lam), {k: torch.lerp(a[k], b[k], float(lam)) for ks in rest for k in ks}) for lam in lambdas]
        loss, correct = [0.0] * len(points), [0] * len(points)
        first = names[0]
        for s in range(0, len(self.x), self.batch_size):
            xb, yb = self.x[s:s + self.batch_size].to(self.device).flatten(1), self.y[s:s + self.batch_size].to(self.device)
            za = F.linear(xb, a[f"{first}.weight"], a.get(f"{first}.bias"))
            zb = F.linear(xb, b[f"{first}.weight"], b.get(f"{first}.bias"))
            for i, (lam, sd) in enumerate(points):
                h = torch.lerp(za, zb, lam)
                for n in names[1:]:
                    h = F.linear(torch.relu(h), sd[f"{n}.weight"], sd.get(f"{n}.bias"))
                loss[i] += float(F.cross_entropy(h, yb, reduction="sum"))
                correct[i] += int((h.argmax(1) == yb).sum())
        n = len(self.x)
        return [{"loss": loss[i] / n, "accuracy": correct[i] / n} for i in range(len(points))]


def train_small_mlp(x: Tensor, y: Tensor, widths: Sequence[int], seed: int, epochs: int = 20,
                    batch_size: int = 64, lr: float = 2e-3) -> dict[str, Tensor]:
    """A small MLP trained with Adam on (x, y), named `layers.{i}.*` (for tests
    and demos; the built-in benchmark trains its own MNIST models). Runs on
    one CPU thread: for layers this small, thread hand-offs cost more than
    they save, and on a busy machine far more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, widths, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(x, y, widths, seed, epochs, batch_size, lr):
    torch.manual_seed(seed)
    layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    opt = torch.optim.Adam(layers.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            b = order[s:s + batch_size]
            sd = {f"layers.{i}.{k}": v for i, m in enumerate(layers) for k, v in m.named_parameters()}
            loss = F.cross_entropy(mlp_forward(sd, x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {f"layers.{i}.{k}": v.detach().clone() for i, m in enumerate(layers) for k, v in m.named_parameters()}
