"""Permutation specs: which axes of which parameters share one permutation.

A spec is data, not code per model: for every parameter, a tuple naming the
permutation group of each axis (or None when that axis is not permuted).
Permuting the hidden units of a group consistently on every axis it touches
leaves the network's function unchanged.

Convention used everywhere in this package: a permutation `p` of a group is a
LongTensor with `new[i] = old[p[i]]` along each axis of the group; in words,
unit i of the permuted model is unit p[i] of the original.

- MLP: group `h{l}` is the output axis of layer l and the input axis of
  layer l+1 (and the bias of layer l).
- CNN: the same with conv kernels (out, in, kh, kw) and BatchNorm vectors.
- ResNet: every block's output projection, the stem and the shortcut share the
  residual stream's group; the inner channels of each block get their own.
- Transformer (`analysis.permutation.transformer.bert_spec`): one residual
  group, one FFN group per layer, and per attention two head-structured
  groups (Q/K and V/O) that share one permutation of whole heads.

Head structure: a group listed in `heads` as (head group, n) is n blocks of
equal width; its permutations must move whole blocks (heads) and permute
freely only inside a block, and every group naming the same head group must
move the heads the same way. `attention` lists the multi-head attentions so
that a spec whose Q and K (or V and the output projection) do not share a
permutation is rejected when it is built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from analysis.errors import ValidationError

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]
Perms = Mapping[str, Tensor]


@dataclass(frozen=True)
class Attention:
    """One multi-head attention: module names of its query, key, value and
    output projections (nn.Linear: `name.weight` is (out, in), `name.bias`
    optional) and its number of heads."""

    query: str
    key: str
    value: str
    output: str
    n_heads: int


@dataclass(frozen=True)
class PermutationSpec:
    """`axes[param] = (group or None for each axis)`; `sizes[group]` = its width.

    `heads[group] = (head group, number of heads)` marks a head-structured
    group; `attention` lists the attentions whose consistency is checked."""

    axes: dict[str, tuple[str | None, ...]]
    heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    attention: tuple[Attention, ...] = ()

    def __post_init__(self):
        counts: dict[str, tuple[int, str]] = {}
        for g, (hg, n) in self.heads.items():
            if g not in self.groups:
                raise ValidationError(f"head-structured group {g!r} is not used by any parameter of the spec")
            if int(n) < 1:
                raise ValidationError(f"group {g!r} declares {n} heads; it needs at least 1")
            if hg in counts and counts[hg][0] != n:
                raise ValidationError(f"head group {hg!r} has {counts[hg][0]} heads in group {counts[hg][1]!r} "
                                      f"but {n} in group {g!r}")
            counts.setdefault(hg, (n, g))
        for att in self.attention:
            self._check_attention(att)

    def _group_of(self, param: str, axis: int) -> str | None:
        groups = self.axes.get(param)
        return None if groups is None or axis >= len(groups) else groups[axis]

    def _check_attention(self, att: Attention) -> None:
        """Q and K share one permutation (scores are per-head dot products
        q.k); V and the output projection's input share one (the output
        projection reads the heads' values); both move whole heads, the same
        way (a head's Q, K, V and output slice travel together)."""
        pairs = {"Q/K": [(f"{att.query}.weight", 0), (f"{att.query}.bias", 0), (f"{att.key}.weight", 0),
                         (f"{att.key}.bias", 0)],
                 "V/O": [(f"{att.value}.weight", 0), (f"{att.value}.bias", 0), (f"{att.output}.weight", 1)]}
        found = {}
        for kind, members in pairs.items():
            ref_param, ref_axis = members[0]
            ref = self._group_of(ref_param, ref_axis)
            for param, axis in members[1:]:
                if param not in self.axes:
                    if param.endswith(".bias"):
                        continue  # a bias-free projection
                    raise ValidationError(f"attention {att.query!r}: the spec has no axes for {param!r}")
                g = self._group_of(param, axis)
                if g != ref:
                    raise ValidationError(
                        f"attention {att.query.rsplit('.', 1)[0]!r}: {kind} must share one permutation, but "
                        f"{ref_param!r} axis {ref_axis} is group {ref!r} while {param!r} axis {axis} is group {g!r} "
                        f"({'scores are per-head dot products q.k' if kind == 'Q/K' else 'the output projection reads the values'})")
            found[kind] = ref
        qk, vo = found["Q/K"], found["V/O"]
        if (qk is None) != (vo is None):
            raise ValidationError(f"attention {att.query!r}: Q/K group is {qk!r} but V/O group is {vo!r}; permute "
                                  "both (their heads move together) or neither")
        for kind, g in found.items():
            if g is None:
                continue
            if g not in self.heads:
                raise ValidationError(f"attention {att.query!r}: {kind} group {g!r} is not head-structured; a free "
                                      "permutation would move units between heads (declare it in `heads`)")
            if self.heads[g][1] != att.n_heads:
                raise ValidationError(f"attention {att.query!r} has {att.n_heads} heads but group {g!r} declares "
                                      f"{self.heads[g][1]}")
        if qk is not None and self.heads[qk][0] != self.heads[vo][0]:
            raise ValidationError(f"attention {att.query!r}: Q/K group {qk!r} moves heads by {self.heads[qk][0]!r} "
                                  f"but V/O group {vo!r} by {self.heads[vo][0]!r}; one head permutation must serve both")

    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """group -> [(param, axis), ...] in parameter order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, groups in self.axes.items():
            for axis, g in enumerate(groups):
                if g is not None:
                    out.setdefault(g, []).append((name, axis))
        return out

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def sizes(self, state_dict: StateDict) -> dict[str, int]:
        """Width of every group, checked to agree on every axis it touches."""
        self.validate(state_dict)
        return {g: int(state_dict[p].shape[a]) for g, ((p, a), *_) in self.groups.items()}

    def validate(self, state_dict: StateDict) -> None:
        """Every spec'd parameter exists with the right rank, and each group has
        one width everywhere."""
        widths: dict[str, tuple[int, str, int]] = {}
        for name, groups in self.axes.items():
            if name not in state_dict:
                raise ValidationError(f"permutation spec names parameter {name!r}, which the state dict does not have "
                                      f"(it has {len(state_dict)} tensors, e.g. {list(state_dict)[:4]})")
            t = state_dict[name]
            if t.dim() != len(groups):
                raise ValidationError(f"permutation spec gives {len(groups)} axes for {name!r} but the tensor has "
                                      f"shape {tuple(t.shape)}")
            for axis, g in enumerate(groups):
                if g is None:
                    continue
                n = int(t.shape[axis])
                if g in widths and widths[g][0] != n:
                    w, other, oaxis = widths[g]
                    raise ValidationError(f"permutation group {g!r} has width {w} on {other!r} axis {oaxis} but "
                                          f"{n} on {name!r} axis {axis}")
                widths.setdefault(g, (n, name, axis))
        for g, (hg, n_heads) in self.heads.items():
            if g in widths and widths[g][0] % n_heads:
                raise ValidationError(f"group {g!r} has width {widths[g][0]}, not divisible into {n_heads} heads")

    def check_perms(self, perms: Perms) -> None:
        """Every head-structured group's permutation moves whole heads, and the
        groups of one head group move them the same way."""
        seen: dict[str, tuple[Tensor, str]] = {}
        for g, (hg, n_heads) in self.heads.items():
            if g not in perms:
                continue
            p = torch.as_tensor(perms[g]).cpu()
            check_permutation(p, None, f"permutation of group {g!r}")
            dh = p.numel() // n_heads
            blocks = (p // dh).view(n_heads, dh)
            bad = (blocks != blocks[:, :1]).any(1)
            if bad.any():
                h = int(bad.nonzero()[0])
                raise ValidationError(f"permutation of group {g!r} splits head {h}: its units come from heads "
                                      f"{sorted(set(blocks[h].tolist()))}; a head must move as a whole")
            order = blocks[:, 0]
            if hg in seen and not torch.equal(seen[hg][0], order):
                raise ValidationError(f"groups {seen[hg][1]!r} and {g!r} share head group {hg!r} but move heads "
                                      f"differently ({seen[hg][0].tolist()} vs {order.tolist()}); Q/K and V/O "
                                      "of a head must travel together")
            seen.setdefault(hg, (order, g))

    def head_units(self) -> list[list[str]]:
        """Groups solved together: every free group alone, and the groups of
        each head group jointly (they share one head permutation)."""
        out, by_head = [], {}
        for g in self.groups:
            if g in self.heads:
                hg = self.heads[g][0]
                if hg not in by_head:
                    by_head[hg] = []
                    out.append(by_head[hg])
                by_head[hg].append(g)
            else:
                out.append([g])
        return out


def mlp_spec(linear_names: Sequence[str], biases: bool | Sequence[bool] = True) -> PermutationSpec:
    """Spec of a chain of Linear layers `name.weight` (out, in) and `name.bias`:
    the hidden units between layer l and l+1 form group `h{l}`; the network's
    input and output are not permuted."""
    names = list(linear_names)
    has_bias = [biases] * len(names) if isinstance(biases, bool) else list(biases)
    axes: dict[str, tuple[str | None, ...]] = {}
    for l, name in enumerate(names):
        out_g = f"h{l}" if l < len(names) - 1 else None
        in_g = f"h{l - 1}" if l > 0 else None
        axes[f"{name}.weight"] = (out_g, in_g)
        if has_bias[l]:
            axes[f"{name}.bias"] = (out_g,)
    return PermutationSpec(axes)


def _index_key(name: str) -> tuple:
    # numeric parts sort numerically: layers.10 after layers.9
    return tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name))


def linear_chain_names(state_dict: StateDict) -> list[str]:
    """Module names of the Linear layers of an MLP state dict, input to output
    (every 2-D `*.weight`, ordered by their numeric indices)."""
    names = [k[: -len(".weight")] for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 2]
    if not names:
        raise ValidationError("no 2-D '*.weight' tensors found: this state dict is not a chain of Linear layers "
                              f"(keys: {list(state_dict)[:6]})")
    return sorted(names, key=_index_key)


def mlp_spec_from_state_dict(state_dict: StateDict) -> PermutationSpec:
    """The MLP spec of a state dict made only of Linear layers (as the MNIST
    models of the built-in benchmark, `layers.{i}.weight/bias`)."""
    names = linear_chain_names(state_dict)
    extra = set(state_dict) - {f"{n}.{s}" for n in names for s in ("weight", "bias")}
    if extra:
        raise ValidationError(f"state dict has tensors that are not Linear weights or biases: {sorted(extra)[:5]}; "
                              "write its PermutationSpec by hand")
    spec = mlp_spec(names, [f"{n}.bias" in state_dict for n in names])
    spec.validate(state_dict)
    return spec


def conv_bn_chain_spec(layers: Sequence[tuple[str, str | None]], head: str | None = None) -> PermutationSpec:
    """Spec of a plain CNN: `layers` = [(conv module name, BatchNorm module name
    or None), ...]; channels after conv l form group `c{l}` (shared with its
    BatchNorm's weight, bias, running_mean, running_var); `head` is an optional
    final Linear whose input axis is the last conv's channels (after global
    pooling)."""
    axes: dict[str, tuple[str | None, ...]] = {}
    for l, (conv, bn) in enumerate(layers):
        g, prev = f"c{l}", (f"c{l - 1}" if l > 0 else None)
        axes[f"{conv}.weight"] = (g, prev, None, None)
        axes[f"{conv}.bias"] = (g,)
        if bn:
            for s in ("weight", "bias", "running_mean", "running_var"):
                axes[f"{bn}.{s}"] = (g,)
    if head:
        axes[f"{head}.weight"] = (None, f"c{len(layers) - 1}")
        axes[f"{head}.bias"] = (None,)
    return PermutationSpec(axes)


def residual_mlp_spec(stem: str, blocks: Sequence[tuple[str, str]], head: str) -> PermutationSpec:
    """Spec of a residual MLP `h = stem(x); h = h + fc2(relu(fc1(h))) per block;
    out = head(h)`: the residual stream is one group `res` shared by the stem's
    output, every block's fc1 input and fc2 output, and the head's input; each
    block's inner units are group `b{i}`. A ResNet is the same with convs."""
    axes: dict[str, tuple[str | None, ...]] = {f"{stem}.weight": ("res", None), f"{stem}.bias": ("res",)}
    for i, (fc1, fc2) in enumerate(blocks):
        axes[f"{fc1}.weight"] = (f"b{i}", "res")
        axes[f"{fc1}.bias"] = (f"b{i}",)
        axes[f"{fc2}.weight"] = ("res", f"b{i}")
        axes[f"{fc2}.bias"] = ("res",)
    axes[f"{head}.weight"] = (None, "res")
    axes[f"{head}.bias"] = (None,)
    return PermutationSpec(axes)


# ---- applying and composing permutations -------------------------------------------------------

def apply_permutation(state_dict: StateDict, spec: PermutationSpec, perms: Perms,
                      except_axis: tuple[str, int] | None = None) -> dict[str, Tensor]:
    """Permute every spec'd axis by its group's permutation (`new = old[p]`).
    Parameters the spec does not name are copied unchanged. `except_axis`
    = (param, axis) leaves that one axis as it is (used by weight matching)."""
    if spec.heads:
        spec.check_perms(perms)
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        for axis, g in enumerate(spec.axes.get(name, ())):
            if g is None or g not in perms or (name, axis) == except_axis:
                continue
            t = torch.index_select(t, axis, perms[g].to(t.device))
        out[name] = t
    return out


def check_permutation(p: Tensor, n: int | None = None, where: str = "") -> None:
    p = torch.as_tensor(p)
    ok = p.dim() == 1 and (n is None or p.numel() == n) and torch.equal(torch.sort(p.cpu()).values,
                                                                        torch.arange(p.numel()))
    if not ok:
        raise ValidationError(f"{where or 'permutation'} is not a permutation of 0..{(n or p.numel()) - 1}: "
                              f"shape {tuple(p.shape)}, values {p.flatten()[:8].tolist()}…")


def invert(p: Tensor) -> Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


def identity_perms(sizes: Mapping[str, int]) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in sizes.items()}


def random_perms(sizes: Mapping[str, int], seed: int = 0, spec: PermutationSpec | None = None) -> dict[str, Tensor]:
    """Uniformly random permutations; with a head-structured `spec`, random
    valid ones (a random head order per head group, shared by its groups,
    and a random order inside every head)."""
    gen = torch.Generator().manual_seed(seed)
    heads = spec.heads if spec is not None else {}
    head_orders: dict[str, Tensor] = {}
    out = {}
    for g, n in sizes.items():
        if g not in heads:
            out[g] = torch.randperm(n, generator=gen)
            continue
        hg, n_heads = heads[g]
        dh = n // n_heads
        order = head_orders.setdefault(hg, torch.randperm(n_heads, generator=gen))
        out[g] = torch.cat([order[h] * dh + torch.randperm(dh, generator=gen) for h in range(n_heads)])
    return out


def compose(first: Perms, then: Perms) -> dict[str, Tensor]:
    """Applying `first` and then `then` equals applying `compose(first, then)`:
    (x[first])[then] = x[first[then]]."""
    return {g: first[g][then[g].to(first[g].device)] for g in first}


def cycle_error(maps: Sequence[Perms]) -> dict[str, float]:
    """Fraction of units that do not come back to themselves around a cycle.

    `maps[k]` aligns model k+1 to model k's basis (unit i of model k matches
    unit maps[k][g][i] of model k+1; the last map aligns model 0 to the last
    model), e.g. [p_AB, p_BC, p_CA] for A -> B -> C -> A. Returns, per group,
    mean(cycle(i) != i); 0.0 means cycle-consistent."""
    out = {}
    for g in maps[0]:
        idx = torch.arange(maps[0][g].numel())
        cur = idx
        for m in maps:
            cur = m[g].cpu()[cur]          # maps may live on any device; the walk is tiny
        out[g] = float((cur != idx).double().mean())
    return out
