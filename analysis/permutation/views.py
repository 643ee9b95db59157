"""What the Alignment page's transformer and latent-space sections show, as
engine functions returning tidy tables (the page only lays them out).

A transformer source is a dict: {"models": {name: BERT state dict with
`heads.<task>.*`}, "n_heads": int, "eps": float, "data": {task: {"train":
(tokens, labels), "test": (tokens, labels)}}} (tokens packed by
`transformer.pack_tokens`), e.g. from `analysis.zoo.transformers.TransformerZoo`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from analysis.errors import ValidationError
from analysis.latent import aggregation_table, choose_anchors, similarity_by_layer
from analysis.permutation.c2m3 import c2m3
from analysis.permutation.pipeline import LABELS, Family, align_to_first, bert_family, compare_paths, merge_models
from analysis.permutation.specs import PermutationSpec, StateDict, cycle_error
from analysis.permutation.transformer import bert_spec, evaluate_heads, layer_features, pooled

LayerFn = Callable[[StateDict, torch.Tensor], Mapping[str, torch.Tensor]]


def _split(source: Mapping, split: str, per_task: int | None) -> dict:
    return {t: (parts[split][0][:per_task], parts[split][1][:per_task]) for t, parts in source["data"].items()}


def pooled_inputs(source: Mapping, split: str, per_task: int | None) -> torch.Tensor:
    """All tasks' sequences of a split, padded to one width."""
    parts = [tok for tok, _ in _split(source, split, per_task).values()]
    width = max(t.shape[2] for t in parts)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in parts])


def transformer_setup(source: Mapping) -> tuple[PermutationSpec, Family]:
    first = next(iter(source["models"].values()))
    return bert_spec(first, source["n_heads"]), bert_family(source["n_heads"], source.get("eps", 1e-12))


def transformer_eval_fn(source: Mapping, per_task: int | None):
    test = _split(source, "test", per_task)
    return lambda sd: evaluate_heads(sd, test, source["n_heads"], source.get("eps", 1e-12), device="cpu")


def transformer_paths(source: Mapping, a: str, b: str, method: str, use_repair: bool, lambdas: Sequence[float],
                      eval_per_task: int | None = None, match_per_task: int = 32):
    """(curves, barriers) of compare_paths for two of the source's models."""
    spec, fam = transformer_setup(source)
    x = pooled_inputs(source, "train", match_per_task)
    m = source["models"]
    return compare_paths(m[a], m[b], spec, transformer_eval_fn(source, eval_per_task), lambdas, method,
                         repair_x=x if use_repair else None, family=fam, match_x=x, device="cpu")


def transformer_merges(source: Mapping, chosen: Sequence[str], use_repair: bool, eval_per_task: int | None = None,
                       match_per_task: int = 32) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Accuracy / loss of each chosen model and of their uniform merge with
    every method (naive, pairwise WM and AM to the first, C2M3), and cycle
    errors (pairwise WM vs C2M3) when three or more are chosen."""
    if len(chosen) < 2:
        raise ValidationError(f"a merge needs at least two models, got {list(chosen)}")
    spec, fam = transformer_setup(source)
    x = pooled_inputs(source, "train", match_per_task)
    sds = [source["models"][k] for k in chosen]
    ev = transformer_eval_fn(source, eval_per_task)
    rows = [{"model": k, **ev(sd)} for k, sd in zip(chosen, sds)]
    res = c2m3(sds, spec, device="cpu", init=fam.c2m3_init)
    for method in ("none", "weight_matching", "activation_matching", "c2m3"):
        merged = merge_models(sds, spec, method, family=fam, match_x=x, repair_x=x if use_repair else None,
                              c2m3_result=res, device="cpu")
        rows.append({"model": f"merge of {len(sds)}: {LABELS[method]}{' + REPAIR' if use_repair else ''}",
                     **ev(merged)})
    cyc = None
    if len(sds) >= 3:
        from analysis.permutation.weight_matching import weight_matching
        n = len(sds)
        loop = [(k, (k + 1) % n) for k in range(n)]
        wm = cycle_error([weight_matching(sds[i], sds[j], spec, device="cpu") for i, j in loop])
        c2 = cycle_error([res.pairwise(i, j) for i, j in loop])
        cyc = pd.DataFrame([{"method": m, "mean cycle error": sum(e.values()) / len(e), "max": max(e.values())}
                            for m, e in (("pairwise weight matching", wm), ("C2M3", c2))])
    return pd.DataFrame(rows), cyc


def layer_similarity(layer_fn: LayerFn, sd_a: StateDict, sd_b: StateDict, aligned_b: StateDict, x: torch.Tensor,
                     n_anchors: int = 64, merged: Mapping[str, StateDict] | None = None) -> pd.DataFrame:
    """Tidy (comparison, layer, measure, value): B vs A before and after
    alignment, and each `merged[label]` vs A, per layer of `layer_fn`."""
    fa = layer_fn(sd_a, x)
    n = len(next(iter(fa.values())))
    idx = choose_anchors(n, min(n_anchors, n))
    comps = {"B vs A, before alignment": sd_b, "B vs A, after alignment": aligned_b, **(merged or {})}
    return pd.concat([similarity_by_layer(fa, layer_fn(sd, x), idx).assign(comparison=label)
                      for label, sd in comps.items()], ignore_index=True)


def latent_view(layer_fn: LayerFn, sds: Mapping[str, StateDict], a: str, b: str, spec: PermutationSpec,
                method: str, x: torch.Tensor, family: Family, match_x: torch.Tensor | None = None,
                n_anchors: int = 64) -> pd.DataFrame:
    """`layer_similarity` for models a and b aligned by `method` (not
    "none"), with their naive and aligned merges against A."""
    pair = [sds[a], sds[b]]
    aligned = align_to_first(pair, spec, method, family=family, match_x=match_x, device="cpu")
    avg = lambda ps: {k: (ps[0][k].float() + ps[1][k].float()) / 2 for k in ps[0]}  # noqa: E731
    return layer_similarity(layer_fn, pair[0], pair[1], aligned[1], x, n_anchors,
                            merged={"naive merge vs A": avg(pair), f"{LABELS[method]} merge vs A": avg(aligned)})


def transformer_aggregation(source: Mapping, names: Sequence[str], n_anchors: int = 64,
                            per_task: int | None = None) -> pd.DataFrame:
    """Relative Latent Space Aggregation of the chosen models per task (last
    layer, mean-pooled), accuracies averaged over tasks: space, model, accuracy."""
    H, eps = source["n_heads"], source.get("eps", 1e-12)
    out = []
    for t, parts in source["data"].items():
        (trx, try_), (tex, tey) = parts["train"], parts["test"]
        trx, try_, tex, tey = trx[:per_task], try_[:per_task], tex[:per_task], tey[:per_task]
        with torch.no_grad():
            tr = {k: pooled(source["models"][k], trx, H, eps) for k in names}
            te = {k: pooled(source["models"][k], tex, H, eps) for k in names}
        out.append(aggregation_table(tr, try_, te, tey, n_anchors=n_anchors))
    return pd.concat(out).groupby(["space", "model"], sort=False)["accuracy"].mean().reset_index()


def transformer_layer_fn(source: Mapping) -> LayerFn:
    return lambda sd, x: layer_features(sd, x, source["n_heads"], source.get("eps", 1e-12))
