"""Interference tables against answers known by construction."""
from __future__ import annotations

import pytest
import torch

from analysis.errors import ValidationError
from analysis.interference import (cosine_table, energy_rank, layer_sti, pairwise_sti_table, sar_by,
                                   sign_conflict_table, sti_table, sti_tables, subspace_alignment_table, task_pair_stats,
                                   unordered_pairs)
from analysis.spectra import SpectralCache
from analysis.taskvectors import TaskVectorSet


def _set(deltas):
    first = next(iter(deltas.values()))
    base = {k: torch.zeros_like(v) for k, v in first.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: base[k] + d[k] for k in base} for t, d in deltas.items()})


def _orthogonal_tasks(tasks=4, m=24, n=16, r=4, seed=0):
    """Task t lives on its own block of r left and r right singular directions."""
    g = torch.Generator().manual_seed(seed)
    qu, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    out = {}
    for t in range(tasks):
        s = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
        u, v = qu[:, t * r:(t + 1) * r], qv[:, t * r:(t + 1) * r]
        out[f"t{t}"] = {"layers.0.w.weight": ((u * s) @ v.T).float(), "layers.0.b.bias": torch.zeros(3)}
    return out


def test_sti_is_zero_for_orthogonal_row_and_column_spaces(tmp_path):
    tvs = _set(_orthogonal_tasks())
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    # k = 16, rank fraction 1/4 keeps exactly the r = 4 directions of each task
    df = sti_table(tvs, 0.25, cache=cache)
    assert list(df.columns) == ["param", "depth", "kind", "module", "rank", "sti"]
    assert df["rank"].tolist() == [4] and df["depth"].tolist() == [0]
    assert df["sti"].iloc[0] < 1e-5
    # random tasks of the same size interfere
    g = torch.Generator().manual_seed(1)
    rnd = _set({f"t{t}": {"layers.0.w.weight": torch.randn(24, 16, generator=g)} for t in range(4)})
    assert sti_table(rnd, 0.25, cache=SpectralCache(rnd, device="cpu", cache_dir=tmp_path))["sti"].iloc[0] > 1.0


def test_sti_matches_the_definition_written_out(tmp_path):
    g = torch.Generator().manual_seed(2)
    tvs = _set({t: {"h.0.w.weight": torch.randn(10, 7, generator=g)} for t in ("a", "b", "c")})
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    sti, r = layer_sti(cache, "h.0.w.weight", 3 / 7)
    assert r == 3
    us, ss, vs = [], [], []
    for task in tvs.tasks:
        u, s, vh = torch.linalg.svd(tvs.delta(task, "h.0.w.weight").double(), full_matrices=False)
        us.append(u[:, :r]); ss.append(s[:r]); vs.append(vh[:r].T)
    U, V, S = torch.cat(us, 1), torch.cat(vs, 1), torch.diag(torch.cat(ss))
    eye = torch.eye(3 * r, dtype=torch.float64)
    expected = float(((U.T @ U - eye) @ S @ (V.T @ V - eye)).abs().sum())
    assert sti == pytest.approx(expected, rel=1e-4)
    # the pair table: the two-task STI computed the same way
    pairs = pairwise_sti_table(tvs, 3 / 7, cache=cache)
    U2, V2, S2 = torch.cat(us[:2], 1), torch.cat(vs[:2], 1), torch.diag(torch.cat(ss[:2]))
    e2 = torch.eye(2 * r, dtype=torch.float64)
    ab = float(((U2.T @ U2 - e2) @ S2 @ (V2.T @ V2 - e2)).abs().sum())
    got = pairs[(pairs.task == "a") & (pairs.task_b == "b")]["sti"].iloc[0]
    assert got == pytest.approx(ab, rel=1e-4)
    assert got == pytest.approx(pairs[(pairs.task == "b") & (pairs.task_b == "a")]["sti"].iloc[0])


def test_identical_tasks_give_the_largest_pairwise_sti(tmp_path):
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(32, 24, generator=g)
    deltas = {"a": shared, "b": shared.clone(), "c": torch.randn(32, 24, generator=g),
              "d": torch.randn(32, 24, generator=g)}
    tvs = _set({t: {"layers.0.w.weight": w, "layers.1.w.weight": w * 0.5} for t, w in deltas.items()})
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    pairs = pairwise_sti_table(tvs, 0.25, cache=cache)
    for _, layer in pairs.groupby("param"):
        top = layer.sort_values("sti", ascending=False).iloc[0]
        assert {top.task, top.task_b} == {"a", "b"}
    assert set(pairs["depth"]) == {0, 1}
    layer, pairs_again = sti_tables(tvs, 0.25, cache=cache)
    assert pairs_again.equals(pairs) and layer.equals(sti_table(tvs, 0.25, cache=cache))
    labelled = unordered_pairs(pairs, tvs.tasks)
    assert len(labelled) == 2 * 6 and "a × b" in set(labelled["pair"])


def test_rank_fraction_change_reuses_cached_factors(tmp_path):
    tvs = _set(_orthogonal_tasks())
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    sti_table(tvs, 0.25, cache=cache)
    n = cache.compute_count
    for f in (0.1, 0.5, 1.0):
        sti_table(tvs, f, cache=cache)
        pairwise_sti_table(tvs, f, cache=cache)
    assert cache.compute_count == n == 1


def test_cosine_similarity_levels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g)
    y = torch.randn(6, 4, generator=g)
    tvs = _set({"a": {"layers.0.w.weight": x, "layers.1.w.weight": y, "emb.bias": torch.ones(3)},
                "b": {"layers.0.w.weight": x * 3, "layers.1.w.weight": -y, "emb.bias": torch.ones(3)},
                "c": {"layers.0.w.weight": torch.randn(6, 4, generator=g), "layers.1.w.weight": y,
                      "emb.bias": -torch.ones(3)}})
    stats = task_pair_stats(tvs, device="cpu")
    per = cosine_table(stats, "param").set_index(["param", "task", "task_b"])["cosine"]
    assert per[("layers.0.w.weight", "a", "b")] == pytest.approx(1.0, abs=1e-6)
    assert per[("layers.1.w.weight", "a", "b")] == pytest.approx(-1.0, abs=1e-6)
    assert per[("emb.bias", "a", "c")] == pytest.approx(-1.0, abs=1e-6)
    assert per[("layers.0.w.weight", "c", "c")] == pytest.approx(1.0)
    whole = cosine_table(stats, "model").set_index(["task", "task_b"])["cosine"]
    va = torch.cat([x.flatten(), y.flatten(), torch.ones(3)]).double()
    vb = torch.cat([3 * x.flatten(), -y.flatten(), torch.ones(3)]).double()
    assert whole[("a", "b")] == pytest.approx(float(va @ vb / va.norm() / vb.norm()), rel=1e-6)
    by_depth = cosine_table(stats, "depth")
    assert set(by_depth["depth"]) == {0, 1}      # emb.bias has no block: not in the per-depth view
    with pytest.raises(ValidationError, match="level"):
        cosine_table(stats, "block")


def test_sign_conflict_rate_hand_worked():
    a = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, -3.0, 5.0]])
    c = torch.tensor([[-0.1, -0.1, 0.1, -0.1]])
    tvs = _set({"a": {"layers.0.w.weight": a}, "b": {"layers.0.w.weight": b}, "c": {"layers.0.w.weight": c}})
    rates = sign_conflict_table(task_pair_stats(tvs, device="cpu"), "model").set_index(["task", "task_b"])
    # a vs b: both nonzero on 3 entries, signs differ on 2 -> 2/3
    assert rates.loc[("a", "b"), "conflict_rate"] == pytest.approx(2 / 3)
    assert rates.loc[("b", "a"), "conflict_rate"] == pytest.approx(2 / 3)
    # b vs c: all four entries nonzero, all disagree
    assert rates.loc[("b", "c"), "conflict_rate"] == pytest.approx(1.0)
    assert ("a", "a") not in rates.index
    # TIES-style trim: keep the top half by magnitude per task; a keeps {-2, 3}, b keeps {-3, 5}
    trimmed = sign_conflict_table(task_pair_stats(tvs, density=0.5, device="cpu")).set_index(["task", "task_b"])
    assert trimmed.loc[("a", "b"), "both"] == 1 and trimmed.loc[("a", "b"), "conflict_rate"] == pytest.approx(1.0)


def test_subspace_alignment_ratio(tmp_path):
    # orthogonal tasks: each task's subspace is part of the sum's; with equal
    # energy per task, 95 % of the sum's energy needs every task's directions
    tasks = _orthogonal_tasks(tasks=2, r=3)
    tvs = _set(tasks)
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path)
    sar = subspace_alignment_table(tvs, cache=cache, energy=1.0)
    assert sar["k"].iloc[0] == 6 and sar["sar"].to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    # a dominant task takes the whole top subspace; a small orthogonal one lies outside it
    big = {"big": {"layers.0.w.weight": tasks["t0"]["layers.0.w.weight"] * 100, "layers.0.b.bias": torch.zeros(3)},
           "small": tasks["t1"]}
    tvs2 = _set(big)
    sar2 = subspace_alignment_table(tvs2, cache=SpectralCache(tvs2, device="cpu", cache_dir=tmp_path), energy=0.95)
    by_task = sar2.set_index("task")["sar"]
    assert sar2["k"].iloc[0] <= 3
    assert by_task["big"] > 0.85 and by_task["small"] < 1e-4
    whole = sar_by(sar2, "model").set_index("task")["sar"]
    assert whole["big"] == pytest.approx(by_task["big"])
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1 and energy_rank(torch.tensor([1.0, 1.0]), 0.95) == 2
