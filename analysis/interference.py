"""Where tasks interfere: Singular Task Interference (STI), cosine similarity,
subspace alignment ratio and sign conflicts, per layer and whole-model.

Every SVD-based table reads truncated factors from a SpectralCache, so a
rank-fraction change re-slices cached factors and never recomputes an SVD.
Every per-layer table carries `depth` (block index, None outside blocks) and
`module` (the parameter's name inside its block).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import pandas as pd
import torch

from analysis.errors import ValidationError
from analysis.spectra import SpectralCache
from analysis.svd import _exact_matmul, as_matrix_batch, truncation_rank
from analysis.taskvectors import TaskVectorSet

LEVELS = ("param", "depth", "model")


def _meta(tvs, name: str) -> dict:
    return tvs.layer_meta(name)


# --------------------------------------------------------------------------- STI
def _cross_gram(x: torch.Tensor, r: int) -> torch.Tensor:
    """x: (T, d, r) per-task orthonormal bases. Returns XᵀX − I for the
    concatenation X = [x_1 … x_T] as (T, r, T, r), with the diagonal blocks
    set to exactly zero: x_tᵀx_t = I holds by construction (SVD factors), and
    the float32 rounding left there (~1e-7 per entry) would otherwise add a
    spurious floor that grows with T·r. Only blocks a < b are multiplied; the
    others are their transposes."""
    t = x.shape[0]
    g = x.new_zeros(t, r, t, r)
    with _exact_matmul():
        for a in range(t - 1):
            blk = x[a].mT @ x[a + 1:]                      # (T-a-1, r, r): x_aᵀ x_b
            g[a, :, a + 1:, :] = blk.permute(1, 0, 2)
            g[a + 1:, :, a, :] = blk.mT
    return g


def _sti_blocks(cache: SpectralCache, name: str, rank_fraction: float):
    (u, s, vh), r = cache.truncated(name, rank_fraction)
    pu = _cross_gram(u, r)                          # (T, r, T, r)  = UᵀU − I
    pv = _cross_gram(vh.mT, r)                      # (T, r, T, r)  = VᵀV − I
    return pu, s, pv, r


def layer_sti(cache: SpectralCache, name: str, rank_fraction: float, pairs: bool = False):
    """STI of one parameter: ‖(UᵀU − I) Σ (VᵀV − I)‖₁ (entry-wise L1) over the
    concatenated per-task truncated SVDs (TSV paper, arXiv 2412.00081).
    Returns (sti, r), or (sti, r, pair) with `pairs=True`, pair (T, T) the
    two-task STI of every pair (diagonal NaN). float32 products, float64 sums.

    Pair values: with zero diagonal blocks the two-task STI is
    ‖P_ab Σ_b Q_abᵀ‖₁ + ‖P_abᵀ Σ_a Q_ab‖₁, P_ab = U_aᵀU_b, Q_ab = V_aᵀV_b
    (symmetric in a, b), read off the same cross-Gram blocks."""
    pu, s, pv, r = _sti_blocks(cache, name, rank_fraction)
    t = s.shape[0]
    a = pu.reshape(t * r, t * r) * s.reshape(1, t * r)
    with _exact_matmul():
        prod = a @ pv.reshape(t * r, t * r)
    sti = float(prod.abs().sum(dtype=torch.float64))
    if not pairs:
        return sti, r
    # all pairs i < j at once: one batched matmul instead of T(T-1)/2 small ones
    ii, jj = torch.triu_indices(t, t, offset=1, device=s.device)
    p = pu.permute(0, 2, 1, 3)[ii, jj]              # (pairs, r, r) = U_iᵀU_j
    q = pv.permute(0, 2, 1, 3)[ii, jj]              # (pairs, r, r) = V_iᵀV_j
    with _exact_matmul():
        vals = (((p * s[jj].unsqueeze(-2)) @ q.mT).abs().sum(dim=(-2, -1), dtype=torch.float64)
                + ((p.mT * s[ii].unsqueeze(-2)) @ q).abs().sum(dim=(-2, -1), dtype=torch.float64)).cpu()
    pair = torch.full((t, t), float("nan"), dtype=torch.float64)
    pair[ii.cpu(), jj.cpu()] = vals
    pair[jj.cpu(), ii.cpu()] = vals
    return sti, r, pair


STI_COLUMNS = ["param", "depth", "kind", "module", "rank", "sti"]
PAIR_COLUMNS = ["param", "depth", "kind", "module", "rank", "task", "task_b", "sti"]


def sti_tables(tvs: TaskVectorSet, rank_fraction: float, cache: SpectralCache | None = None,
               names: Iterable[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`sti_table` and `pairwise_sti_table` in one pass over the cached factors."""
    cache = cache if cache is not None else SpectralCache(tvs)
    _check_cache(tvs, cache)
    tasks = cache.tasks
    rows, pair_rows = [], []
    for name in (cache.names if names is None else names):
        sti, r, pair = layer_sti(cache, name, rank_fraction, pairs=True)
        meta = _meta(tvs, name)
        rows.append({**meta, "rank": r, "sti": sti})
        for i, j in itertools.permutations(range(len(tasks)), 2):
            pair_rows.append({**meta, "rank": r, "task": tasks[i], "task_b": tasks[j], "sti": float(pair[i, j])})
    return pd.DataFrame(rows, columns=STI_COLUMNS), pd.DataFrame(pair_rows, columns=PAIR_COLUMNS)


def sti_table(tvs: TaskVectorSet, rank_fraction: float, cache: SpectralCache | None = None,
              names: Iterable[str] | None = None) -> pd.DataFrame:
    """Per-layer Singular Task Interference at a rank fraction.
    Columns: param, depth, kind, module, rank, sti."""
    cache = cache if cache is not None else SpectralCache(tvs)
    _check_cache(tvs, cache)
    rows = []
    for name in (cache.names if names is None else names):
        sti, r = layer_sti(cache, name, rank_fraction)
        rows.append({**_meta(tvs, name), "rank": r, "sti": sti})
    return pd.DataFrame(rows, columns=STI_COLUMNS)


def pairwise_sti_table(tvs: TaskVectorSet, rank_fraction: float, cache: SpectralCache | None = None,
                       names: Iterable[str] | None = None) -> pd.DataFrame:
    """STI of every task pair per layer: the STI of the two-task concatenation
    (see `layer_sti`). Both orders are listed, the diagonal (a task with
    itself) is not. Columns: param, depth, kind, module, rank, task, task_b, sti."""
    return sti_tables(tvs, rank_fraction, cache, names)[1]


def _check_cache(tvs: TaskVectorSet, cache: SpectralCache) -> None:
    if cache.tvs is not tvs and cache.tasks != tvs.tasks:
        raise ValidationError(f"the spectral cache holds tasks {cache.tasks}, the set has {tvs.tasks}")


# --------------------------------------------------------------------------- pair statistics
def task_pair_stats(tvs: TaskVectorSet, names: Iterable[str] | None = None, density: float = 1.0,
                    device: str | torch.device | None = None) -> pd.DataFrame:
    """One pass over the deltas: per parameter and ordered task pair (a, b),
    including a == b: `dot` = <τ_a, τ_b>, `conflicts` = entries where both
    are nonzero with opposite signs, `both` = entries where both are nonzero,
    `numel`. With density < 1, signs are taken after keeping each task's
    top-`density` entries by magnitude (TIES' trim step); dots use the full
    deltas. Columns: param, depth, kind, module, task, task_b, dot,
    conflicts, both, numel."""
    from analysis.device import get_device
    if not (0.0 < density <= 1.0):
        raise ValidationError(f"density must be in (0, 1], got {density!r}")
    dev = get_device(device)
    tasks = tvs.tasks
    rows = []
    for name in (tvs.param_names if names is None else names):
        d = tvs.deltas(name).reshape(len(tasks), -1).to(dev)
        n = d.shape[1]
        with _exact_matmul():
            dd = d.double()
            gram = (dd @ dd.mT).cpu()
            kept = d
            if density < 1.0:
                keep = max(1, int(math.ceil(density * n)))
                thr = d.abs().topk(keep, dim=1).values[:, -1:]
                kept = torch.where(d.abs() >= thr, d, torch.zeros_like(d))
            sg = torch.sign(kept).double()
            nz = sg.abs()
            agree_minus_conflict = (sg @ sg.mT).cpu()
            both = (nz @ nz.mT).cpu()
        conflicts = (both - agree_minus_conflict) / 2
        meta = _meta(tvs, name)
        for a, ta in enumerate(tasks):
            for b, tb in enumerate(tasks):
                rows.append({**meta, "task": ta, "task_b": tb, "dot": float(gram[a, b]),
                             "conflicts": float(conflicts[a, b]), "both": float(both[a, b]), "numel": n})
    return pd.DataFrame(rows, columns=["param", "depth", "kind", "module", "task", "task_b", "dot", "conflicts",
                                       "both", "numel"])


def _grouped(stats: pd.DataFrame, level: str) -> tuple[pd.DataFrame, list[str]]:
    if level not in LEVELS:
        raise ValidationError(f"level must be one of {LEVELS}, got {level!r}")
    keys = {"param": ["param", "depth", "kind", "module"], "depth": ["depth"], "model": []}[level]
    s = stats.copy()
    if level == "depth":
        s = s[s["depth"].notna()]
    agg = s.groupby(keys + ["task", "task_b"], sort=False, dropna=False)[["dot", "conflicts", "both", "numel"]].sum()
    return agg.reset_index(), keys


def _lookup_keys(level: str) -> list[str]:
    # "param" is unique per parameter; depth/kind/module ride along (and may be NaN)
    return {"param": ["param"], "depth": ["depth"], "model": []}[level]


def cosine_table(stats: pd.DataFrame, level: str = "model") -> pd.DataFrame:
    """Cosine similarity of task vectors from `task_pair_stats`, task × task
    (tidy, both orders and the diagonal), whole-model ("model"), per block
    ("depth": all parameters of a block concatenated) or per parameter."""
    agg, keys = _grouped(stats, level)
    lk = _lookup_keys(level)
    diag = agg[agg["task"] == agg["task_b"]]
    sq = {tuple(r[:-1]): r[-1] for r in diag[lk + ["task", "dot"]].itertuples(index=False, name=None)}
    cos = []
    for r in agg[lk + ["task", "task_b", "dot"]].itertuples(index=False, name=None):
        *key, a, b, dot = r
        z = math.sqrt(sq[(*key, a)] * sq[(*key, b)])
        cos.append(dot / z if z > 0 else float("nan"))
    agg["cosine"] = cos
    return agg[keys + ["task", "task_b", "cosine"]]


def sign_conflict_table(stats: pd.DataFrame, level: str = "model") -> pd.DataFrame:
    """Sign-conflict rate between task pairs: among entries where both task
    vectors are nonzero (after the optional trim), the share whose signs
    disagree — the conflicts TIES' sign election resolves. Off-diagonal pairs
    only (a task never conflicts with itself)."""
    agg, keys = _grouped(stats, level)
    agg = agg[agg["task"] != agg["task_b"]].copy()
    agg["conflict_rate"] = [c / b if b > 0 else float("nan") for c, b in zip(agg["conflicts"], agg["both"])]
    return agg[keys + ["task", "task_b", "conflict_rate", "conflicts", "both"]].reset_index(drop=True)


def cosine_similarity_table(tvs: TaskVectorSet, level: str = "model", names: Iterable[str] | None = None,
                            device=None) -> pd.DataFrame:
    return cosine_table(task_pair_stats(tvs, names, device=device), level)


# --------------------------------------------------------------------------- subspace alignment
def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top singular values hold at least `energy` of Σσ²."""
    if not (0.0 < energy <= 1.0):
        raise ValidationError(f"energy must be in (0, 1], got {energy!r}")
    s2 = s.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    frac = s2.cumsum(0) / total
    return int(min(len(s), int((frac < energy - 1e-12).sum()) + 1))


def subspace_alignment_table(tvs: TaskVectorSet, cache: SpectralCache | None = None, energy: float = 0.95,
                             names: Iterable[str] | None = None) -> pd.DataFrame:
    """Subspace alignment ratio (Iso-C / Iso-CTS paper, Marczak et al. 2025):
    SAR_t = ‖Π τ_t‖_F / ‖τ_t‖_F with Π = U_k U_kᵀ the projection onto the top-k
    left singular vectors of the summed matrix Σ_t τ_t, k the smallest rank
    holding `energy` of its squared Frobenius norm. From cached factors:
    ‖U_kᵀ τ_t‖_F = ‖U_kᵀ U_t Σ_t‖_F. Columns: param, depth, kind, module, task,
    k, proj_sq, norm_sq, sar (proj_sq / norm_sq summed over parameters give
    the whole-model ratio, see `sar_by`)."""
    cache = cache if cache is not None else SpectralCache(tvs)
    _check_cache(tvs, cache)
    rows = []
    for name in (cache.names if names is None else names):
        um, sm, _ = cache.sum_factors(name)
        k = energy_rank(sm, energy)
        s = cache.singular_values(name).to(um.device)            # every σ is kept
        with _exact_matmul():
            if cache.keeps_all(name):
                u, _, _ = cache.factors(name)
                proj = (um[:, :k].double().mT.unsqueeze(0) @ u.double()) * s.double().unsqueeze(-2)
            else:   # the cache keeps only the top K directions of each τ_t: project the deltas themselves
                taus = as_matrix_batch(cache.tvs.deltas(name)).to(um.device, torch.float64)
                proj = um[:, :k].double().mT.unsqueeze(0) @ taus
        proj_sq = (proj ** 2).sum(dim=(-2, -1)).cpu()
        norm_sq = (s.double() ** 2).sum(-1).cpu()
        meta = _meta(tvs, name)
        for ti, task in enumerate(cache.tasks):
            ns = float(norm_sq[ti])
            rows.append({**meta, "task": task, "k": k, "proj_sq": float(proj_sq[ti]), "norm_sq": ns,
                         "sar": math.sqrt(float(proj_sq[ti]) / ns) if ns > 0 else float("nan")})
    return pd.DataFrame(rows, columns=["param", "depth", "kind", "module", "task", "k", "proj_sq", "norm_sq", "sar"])


def sar_by(table: pd.DataFrame, level: str = "model") -> pd.DataFrame:
    """Aggregate a SAR table per block ("depth") or whole model: sqrt(Σ proj² / Σ ‖τ‖²)."""
    if level not in ("depth", "model"):
        raise ValidationError(f"level must be 'depth' or 'model', got {level!r}")
    keys = ["depth", "task"] if level == "depth" else ["task"]
    t = table[table["depth"].notna()] if level == "depth" else table
    agg = t.groupby(keys, sort=False)[["proj_sq", "norm_sq"]].sum().reset_index()
    agg["sar"] = (agg["proj_sq"] / agg["norm_sq"]) ** 0.5
    return agg


# --------------------------------------------------------------------------- helpers for views
def pair_label(a: str, b: str) -> str:
    return f"{a} × {b}"


def unordered_pairs(df: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Keep each unordered pair once (task before task_b in the set's order) and label it."""
    order = {t: i for i, t in enumerate(tasks)}
    keep = df[[order[a] < order[b] for a, b in zip(df["task"], df["task_b"])]].copy()
    keep["pair"] = [pair_label(a, b) for a, b in zip(keep["task"], keep["task_b"])]
    return keep


__all__ = ["sti_table", "sti_tables", "pairwise_sti_table", "layer_sti", "task_pair_stats", "cosine_table", "sign_conflict_table",
           "cosine_similarity_table", "subspace_alignment_table", "sar_by", "energy_rank", "unordered_pairs",
           "pair_label", "as_matrix_batch", "truncation_rank"]
