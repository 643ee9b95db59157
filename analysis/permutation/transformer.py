"""BERT-style encoders (transformers' `BertModel` parameter names) as pure
functions of their state dict, and their permutation spec.

Post-LayerNorm BERT: h = LN(emb); per layer h1 = LN(h + O(attn(Q h, K h, V h)))
and h = LN(h1 + W2 gelu(W1 h1)). Sequence features are the mean of the last
hidden states over non-padding tokens (as sentence-transformers' MiniLM), or,
when the state dict holds a pooler (`pooler.dense.*`), BERT's pooled output
tanh(W h_[CLS] + b), which is what `BertForSequenceClassification`'s
classifier reads; optional linear heads `heads.<task>.weight/bias` read them.

Inputs are packed as one LongTensor `tokens` (N, 2, L) = stack(input_ids,
attention_mask), so that REPAIR and activation statistics can slice batches of
it like any other input tensor (`pack_tokens`).

Permutation symmetries (`bert_spec`):
- `res`: the residual stream, shared by the embeddings (word, position,
  token type), every LayerNorm, every block's Q/K/V and FFN input axes, every
  attention output and FFN output projection's output axis, and the heads'
  input axis (without a pooler). LayerNorm's mean and variance over features
  are invariant to a permutation of them, and its weight and bias are per
  feature.
- `pooler` (only with a pooler): its output units (the pooler's rows and
  bias, and the input axis of the heads that read it).
- `l{i}.ffn`: the FFN hidden units of layer i (intermediate out, output in).
- `l{i}.qk` and `l{i}.vo`: the attention's query/key and value/output units,
  head-structured with one head permutation `l{i}.heads` shared by both; inside
  a head, Q and K share one permutation (scores are per-head dot products) and
  V and the output projection another.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from analysis.device import get_device
from analysis.errors import ValidationError
from analysis.permutation.specs import Attention, PermutationSpec, StateDict

Tensor = torch.Tensor
WORD = "embeddings.word_embeddings.weight"
POOLER = "pooler.dense"


def pack_tokens(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(N, 2, L) int64: the one input tensor of this module's functions."""
    if input_ids.shape != attention_mask.shape:
        raise ValidationError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                              f"{tuple(attention_mask.shape)} differ in shape")
    return torch.stack([input_ids.long(), attention_mask.long()], 1)


def bert_prefix(sd: StateDict) -> str:
    """'' for a BertModel state dict, 'bert.' for BertFor... models."""
    hits = [k[: -len(WORD)] for k in sd if k.endswith(WORD)]
    if len(hits) != 1:
        raise ValidationError(f"expected one '*{WORD}' tensor in a BERT state dict, found {len(hits)} "
                              f"(keys: {list(sd)[:5]})")
    return hits[0]


def bert_layers(sd: StateDict, prefix: str | None = None) -> int:
    prefix = bert_prefix(sd) if prefix is None else prefix
    pat = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if not idx or idx != set(range(len(idx))):
        raise ValidationError(f"encoder layers under {prefix!r}encoder.layer.* are {sorted(idx)}; expected 0..n-1")
    return len(idx)


def has_pooler(sd: StateDict, prefix: str | None = None) -> bool:
    """Whether the heads read BERT's pooled output (the state dict holds `pooler.dense.weight`)."""
    return f"{bert_prefix(sd) if prefix is None else prefix}{POOLER}.weight" in sd


def head_names(sd: StateDict) -> list[str]:
    """Task names of the linear heads `heads.<task>.weight`."""
    return sorted(k[len("heads."):-len(".weight")] for k in sd if k.startswith("heads.") and k.endswith(".weight"))


def bert_spec(sd: StateDict, n_heads: int, extra_inputs: Sequence[str] = ()) -> PermutationSpec:
    """The spec of a BERT state dict (prefix and depth read from its keys;
    the number of heads is not in the weights, so it is an argument).
    `heads.<task>.*` linear heads and the modules in `extra_inputs` (Linear
    layers reading the pooled features, e.g. 'classifier') get the pooled
    features' permutation on their input axis: the residual one, or with a
    pooler the `pooler` group, which also permutes the pooler's output."""
    if int(n_heads) < 1:
        raise ValidationError(f"n_heads must be >= 1, got {n_heads}")
    p = bert_prefix(sd)
    axes: dict[str, tuple[str | None, ...]] = {}

    def put(name, groups):
        if name in sd:
            axes[name] = groups

    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        put(f"{p}embeddings.{e}.weight", (None, "res"))
    put(f"{p}embeddings.LayerNorm.weight", ("res",))
    put(f"{p}embeddings.LayerNorm.bias", ("res",))
    heads, attention = {}, []
    for i in range(bert_layers(sd, p)):
        L = f"{p}encoder.layer.{i}."
        att = Attention(f"{L}attention.self.query", f"{L}attention.self.key", f"{L}attention.self.value",
                        f"{L}attention.output.dense", int(n_heads))
        for proj, g in ((att.query, f"l{i}.qk"), (att.key, f"l{i}.qk"), (att.value, f"l{i}.vo")):
            put(f"{proj}.weight", (g, "res"))
            put(f"{proj}.bias", (g,))
        put(f"{att.output}.weight", ("res", f"l{i}.vo"))
        put(f"{att.output}.bias", ("res",))
        put(f"{L}intermediate.dense.weight", (f"l{i}.ffn", "res"))
        put(f"{L}intermediate.dense.bias", (f"l{i}.ffn",))
        put(f"{L}output.dense.weight", ("res", f"l{i}.ffn"))
        put(f"{L}output.dense.bias", ("res",))
        for ln in (f"{L}attention.output.LayerNorm", f"{L}output.LayerNorm"):
            put(f"{ln}.weight", ("res",))
            put(f"{ln}.bias", ("res",))
        heads |= {f"l{i}.qk": (f"l{i}.heads", int(n_heads)), f"l{i}.vo": (f"l{i}.heads", int(n_heads))}
        attention.append(att)
    read = "res"
    if has_pooler(sd, p):
        read = "pooler"
        put(f"{p}{POOLER}.weight", ("pooler", "res"))
        put(f"{p}{POOLER}.bias", ("pooler",))
    for name in [f"heads.{t}" for t in head_names(sd)] + list(extra_inputs):
        put(f"{name}.weight", (None, read))
    spec = PermutationSpec(axes, heads, tuple(attention))
    spec.validate(sd)
    return spec


# ---- the forward pass ----------------------------------------------------------------------------

def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def bert_forward(sd: StateDict, tokens: Tensor, n_heads: int, eps: float = 1e-12, taps: bool = False):
    """Last hidden states (N, L, d); with `taps`, also a dict of the
    intermediate activations by name (each (N, L, width)):
    `emb_ln`, `l{i}.q/k/v` (projections), `l{i}.attn_ln`, `l{i}.ffn_pre`,
    `l{i}.ffn` (after GELU), `l{i}.out_ln`. `eps` is the LayerNorm epsilon
    (BertConfig's layer_norm_eps, 1e-12 by default)."""
    p = bert_prefix(sd)
    ids, mask = tokens[:, 0], tokens[:, 1]
    n, length = ids.shape
    tt = sd.get(f"{p}embeddings.token_type_embeddings.weight")
    h = sd[f"{p}{WORD}"][ids] + sd[f"{p}embeddings.position_embeddings.weight"][:length]
    if tt is not None:
        h = h + tt[0]
    h = _ln(h, sd, f"{p}embeddings.LayerNorm", eps)
    out = {"emb_ln": h}
    bias = torch.zeros(n, 1, 1, length, dtype=h.dtype, device=h.device).masked_fill(
        mask[:, None, None, :] == 0, torch.finfo(h.dtype).min)
    for i in range(bert_layers(sd, p)):
        L = f"{p}encoder.layer.{i}."
        q, k, v = (_lin(h, sd, f"{L}attention.self.{m}") for m in ("query", "key", "value"))
        dh = q.shape[-1] // n_heads
        split = lambda t: t.view(n, length, n_heads, dh).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh) + bias
        ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, length, -1)
        h1 = _ln(h + _lin(ctx, sd, f"{L}attention.output.dense"), sd, f"{L}attention.output.LayerNorm", eps)
        pre = _lin(h1, sd, f"{L}intermediate.dense")
        act = F.gelu(pre)
        h = _ln(h1 + _lin(act, sd, f"{L}output.dense"), sd, f"{L}output.LayerNorm", eps)
        if taps:
            out |= {f"l{i}.q": q, f"l{i}.k": k, f"l{i}.v": v, f"l{i}.attn_ln": h1, f"l{i}.ffn_pre": pre,
                    f"l{i}.ffn": act, f"l{i}.out_ln": h}
    return (h, out) if taps else h


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool(sd: StateDict, h: Tensor, mask: Tensor) -> Tensor:
    """The sequence features of last hidden states `h`: tanh(W h_[CLS] + b)
    with a pooler (BertModel's pooler_output; [CLS] is the first token), else
    the mean over non-padding tokens."""
    p = bert_prefix(sd)
    if has_pooler(sd, p):
        return torch.tanh(_lin(h[:, 0], sd, f"{p}{POOLER}"))
    return mean_pool(h, mask)


def pooled(sd: StateDict, tokens: Tensor, n_heads: int, eps: float = 1e-12) -> Tensor:
    """The features the heads read, (N, d) (see `pool`)."""
    return pool(sd, bert_forward(sd, tokens, n_heads, eps), tokens[:, 1])


def head_logits(sd: StateDict, task: str, tokens: Tensor, n_heads: int, eps: float = 1e-12) -> Tensor:
    return F.linear(pooled(sd, tokens, n_heads, eps), sd[f"heads.{task}.weight"], sd[f"heads.{task}.bias"])


# ---- what activation matching and REPAIR read ----------------------------------------------------

def _tokens_of(t: Tensor, mask: Tensor) -> Tensor:
    """(non-padding tokens, width) rows of an (N, L, width) activation."""
    return t[mask.bool()]


def group_features(sd: StateDict, tokens: Tensor, n_heads: int, eps: float = 1e-12) -> dict[str, list[Tensor]]:
    """For activation matching: per group of `bert_spec`, the activations
    whose units it permutes, as (tokens, width) matrices. `res`: the
    residual stream everywhere it is written (every LayerNorm's output);
    `l{i}.qk`: the queries and the keys; `l{i}.vo`: the values; `l{i}.ffn`:
    the FFN hidden units after GELU; `pooler`: the pooled output, one row per
    sequence."""
    h, taps = bert_forward(sd, tokens, n_heads, eps, taps=True)
    mask = tokens[:, 1]
    n_layers = sum(1 for k in taps if k.endswith(".out_ln"))
    out = {"res": [_tokens_of(taps["emb_ln"], mask)]}
    if has_pooler(sd):
        out["pooler"] = [pool(sd, h, mask)]
    for i in range(n_layers):
        out["res"] += [_tokens_of(taps[f"l{i}.attn_ln"], mask), _tokens_of(taps[f"l{i}.out_ln"], mask)]
        out[f"l{i}.qk"] = [_tokens_of(taps[f"l{i}.q"], mask), _tokens_of(taps[f"l{i}.k"], mask)]
        out[f"l{i}.vo"] = [_tokens_of(taps[f"l{i}.v"], mask)]
        out[f"l{i}.ffn"] = [_tokens_of(taps[f"l{i}.ffn"], mask)]
    return out


def repair_targets(sd: StateDict) -> list[tuple[str, str]]:
    """(weight, bias) pairs REPAIR folds its per-unit correction into, in
    forward order: every LayerNorm (its output is the residual stream; the
    correction rescales and shifts its affine weight and bias) and every FFN
    input projection (the hidden pre-activations). Q/K/V are left alone: a
    per-unit rescaling of Q or K changes the attention's temperature. So is a
    pooler: it reads one token per sequence, and its merge is the plain
    (aligned) average."""
    p = bert_prefix(sd)
    out = [(f"{p}embeddings.LayerNorm.weight", f"{p}embeddings.LayerNorm.bias")]
    for i in range(bert_layers(sd, p)):
        L = f"{p}encoder.layer.{i}."
        out += [(f"{L}attention.output.LayerNorm.weight", f"{L}attention.output.LayerNorm.bias"),
                (f"{L}intermediate.dense.weight", f"{L}intermediate.dense.bias"),
                (f"{L}output.LayerNorm.weight", f"{L}output.LayerNorm.bias")]
    return out


def repair_preactivations(n_heads: int, eps: float = 1e-12):
    """preact_fn for `repair.repair`: the activations `repair_targets` produce,
    in the same order, as (tokens, units)."""
    def fn(sd: StateDict, tokens: Tensor) -> list[Tensor]:
        _, taps = bert_forward(sd, tokens, n_heads, eps, taps=True)
        mask = tokens[:, 1]
        n_layers = sum(1 for k in taps if k.endswith(".out_ln"))
        names = ["emb_ln"] + [f"l{i}.{t}" for i in range(n_layers) for t in ("attn_ln", "ffn_pre", "out_ln")]
        return [_tokens_of(taps[n], mask) for n in names]
    return fn


def layer_features(sd: StateDict, tokens: Tensor, n_heads: int, eps: float = 1e-12) -> dict[str, Tensor]:
    """Per layer, the sequence representation (mean over non-padding tokens)
    of the residual stream: `embeddings`, `layer 1`, ... (N, d) each; with
    a pooler, also `pooler` (its output)."""
    h, taps = bert_forward(sd, tokens, n_heads, eps, taps=True)
    mask = tokens[:, 1]
    n_layers = sum(1 for k in taps if k.endswith(".out_ln"))
    out = {"embeddings": mean_pool(taps["emb_ln"], mask)}
    for i in range(n_layers):
        out[f"layer {i + 1}"] = mean_pool(taps[f"l{i}.out_ln"], mask)
    if has_pooler(sd):
        out["pooler"] = pool(sd, h, mask)
    return out


@torch.no_grad()
def evaluate_heads(sd: StateDict, data: Mapping[str, tuple[Tensor, Tensor]], n_heads: int, eps: float = 1e-12,
                   batch_size: int = 256, device: str | torch.device | None = None) -> dict[str, float]:
    """Mean over tasks of each task head's cross-entropy and accuracy;
    `data[task] = (tokens, labels)`."""
    device = get_device(device)
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}
    losses, accs = [], []
    for task, (tokens, y) in data.items():
        loss, correct = 0.0, 0
        for s in range(0, len(y), batch_size):
            tb = tokens[s:s + batch_size].to(device)
            width = int(tb[:, 1].sum(1).max())
            out = head_logits(params, task, tb[:, :, :width], n_heads, eps)
            yb = y[s:s + batch_size].to(device)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        losses.append(loss / len(y))
        accs.append(correct / len(y))
    return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}
