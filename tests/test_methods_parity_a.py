"""Iso-CTS's published rank split, and LiNeS, Model Breadcrumbs, DELLA, Model
Stock and the Karcher mean against answers known by construction."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.errors import HyperparameterError
from analysis.merging import merge
from analysis.merging.della import keep_probabilities, magprune
from analysis.merging.iso import split_rank
from analysis.merging.lines import layer_scale
from test_merging import exact_set, random_set


def published_split(r: int, n_tasks: int, c: float) -> tuple[int, int]:
    """The arithmetic of the authors' iso_cts code, line by line."""
    common = int(r * c)
    task_total = round((r - common) / n_tasks) * n_tasks
    common = r - task_total
    return common, int((r - common) / n_tasks)


# ---------------------------------------------------------------- Iso-CTS rank split
def test_iso_cts_split_is_the_published_rule_on_a_grid():
    capped = 0
    for r in [*range(1, 41), 64, 100, 384, 512, 768, 1024]:
        for n_tasks in (1, 2, 3, 4, 5, 7, 8, 12, 20):
            for c in (0.0, 0.05, 0.1, 0.25, 0.29, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
                common, per_task = split_rank(r, n_tasks, c)
                assert common + n_tasks * per_task == r and common >= 0 and per_task >= 0
                ref_common, ref_per_task = published_split(r, n_tasks, c)
                if ref_common >= 0:            # the published code's own answer
                    assert (common, per_task) == (ref_common, ref_per_task), (r, n_tasks, c)
                else:                          # it would take a negative common size: capped
                    capped += 1
                    assert per_task == r // n_tasks == ref_per_task - 1, (r, n_tasks, c)
    assert capped > 0


def test_iso_cts_split_worked_by_hand():
    assert split_rank(384, 8, 0.8) == (304, 10)     # int(307.2) = 307, round(77/8 = 9.625) = 10, 384 − 80
    assert split_rank(768, 8, 0.8) == (616, 19)     # int(614.4) = 614, round(19.25) = 19
    assert split_rank(20, 8, 0.0) == (4, 2)         # round(2.5) = 2: halves go to even, as Python's round
    assert split_rank(28, 8, 0.0) == (4, 3)         # round(3.5) = 4 would need 32 > 28 directions: capped at 3
    assert split_rank(100, 4, 0.29) == (28, 18)     # int(0.29 · 100) = int(28.999…) = 28, as the published code
    assert split_rank(12, 3, 1.0) == (12, 0)        # c = 1: Iso-C
    assert split_rank(384, 8, 0.8, "exact_fill") == (312, 9)
    with pytest.raises(ValueError, match="rule"):
        split_rank(10, 2, 0.5, "nearest")
    with pytest.raises(ValueError, match="common_fraction"):
        split_rank(10, 2, 1.5)


def test_iso_cts_with_the_capped_split_keeps_r_flat_directions():
    # 8 tasks on a 12 × 20 matrix, c = 0: round(12/8) = 2 per task would need 16 > 12 directions
    tvs = random_set(n_tasks=8, shapes={"blocks.0.attn.weight": (12, 20), "blocks.0.attn.bias": (12,)})
    assert split_rank(12, 8, 0.0) == (4, 1)
    out = merge(tvs, "iso_cts", common_fraction=0.0, alpha=1.0, device="cpu", polar="exact")["blocks.0.attn.weight"]
    s = torch.linalg.svdvals(out.double())
    assert s.shape[0] == 12 and torch.isfinite(s).all()
    torch.testing.assert_close(s, s.mean().expand_as(s), rtol=1e-4, atol=0)


def test_iso_cts_split_knob_picks_the_rule():
    tvs = random_set(n_tasks=3, shapes={"blocks.0.attn.weight": (10, 16)})
    assert split_rank(10, 3, 0.5) != split_rank(10, 3, 0.5, "exact_fill")     # (4, 2) and (7, 1)
    pub = merge(tvs, "iso_cts", common_fraction=0.5, device="cpu")["blocks.0.attn.weight"]
    fill = merge(tvs, "iso_cts", common_fraction=0.5, split="exact_fill", device="cpu")["blocks.0.attn.weight"]
    assert not torch.allclose(pub, fill)
    default = merge(tvs, "iso_cts", common_fraction=0.5, split="published", device="cpu")["blocks.0.attn.weight"]
    torch.testing.assert_close(default, pub, rtol=0, atol=0)


# ---------------------------------------------------------------- LiNeS
def blocks_set(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.w": (4, 5), "blocks.0.b": (4,), "blocks.1.w": (4, 5), "blocks.2.w": (5, 4),
              "embed.weight": (6, 4), "head.weight": (3, 4)}
    return exact_set({f"t{i}": {k: torch.randn(s, generator=g) for k, s in shapes.items()} for i in range(n_tasks)})


def test_lines_with_beta_0_is_task_arithmetic_at_alpha_kappa_over_t():
    tvs = random_set(n_tasks=3)
    for kappa in (1.0, 0.6):
        lines = merge(tvs, "lines", beta=0.0, alpha_scale=kappa, device="cpu")
        ta = merge(tvs, "task_arithmetic", alpha=kappa / 3, device="cpu")
        for name in tvs.param_names:
            torch.testing.assert_close(lines[name], ta[name], rtol=1e-6, atol=1e-7)


def test_lines_scales_each_block_linearly_in_depth():
    tvs = blocks_set(n_tasks=4)
    beta = 0.8
    out = merge(tvs, "lines", beta=beta, device="cpu")
    # L = 3 blocks: λ = 1/4, 1/4 + 0.4, 1/4 + 0.8; outside the blocks λ = α = 1/4
    expected = {"blocks.0.w": 0.25, "blocks.0.b": 0.25, "blocks.1.w": 0.25 + 0.4, "blocks.2.w": 0.25 + 0.8,
                "embed.weight": 0.25, "head.weight": 0.25}
    for name, lam in expected.items():
        torch.testing.assert_close(out[name], lam * tvs.deltas(name).sum(0), rtol=1e-6, atol=1e-7)
    assert layer_scale(5, 1, 0.3, 0.9) == 0.3 and layer_scale(None, 12, 0.3, 0.9) == 0.3
    assert layer_scale(11, 12, 0.3, 0.9) == pytest.approx(1.2)


def test_lines_on_ties_has_the_l1_norm_of_the_mean_task_vector():
    tvs = blocks_set(n_tasks=3, seed=1)
    out = merge(tvs, "lines", base="ties", beta=0.0, density=0.3, device="cpu")
    ties = merge(tvs, "ties", density=0.3, alpha=1.0, device="cpu")
    l1_sum = sum(float(tvs.deltas(n).sum(0).double().abs().sum()) for n in tvs.param_names)
    l1_ties = sum(float(ties[n].double().abs().sum()) for n in tvs.param_names)
    alpha = l1_sum / (3 * l1_ties)
    for name in tvs.param_names:
        torch.testing.assert_close(out[name], alpha * ties[name], rtol=1e-5, atol=1e-7)
    l1_out = sum(float(out[n].double().abs().sum()) for n in tvs.param_names)
    assert l1_out == pytest.approx(l1_sum / 3, rel=1e-5)
    # β moves only the deeper blocks: block 0 and the parameters outside the blocks keep α
    deep = merge(tvs, "lines", base="ties", beta=1.0, density=0.3, device="cpu")
    torch.testing.assert_close(deep["blocks.0.w"], out["blocks.0.w"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(deep["blocks.2.w"], (alpha + 1.0) * ties["blocks.2.w"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- Model Breadcrumbs
def test_breadcrumbs_with_nothing_masked_is_task_arithmetic():
    tvs = random_set(n_tasks=3)
    for gamma in (0.0, 0.2):
        crumbs = merge(tvs, "breadcrumbs", density=1.0, gamma=gamma, alpha=0.4, device="cpu")
        ta = merge(tvs, "task_arithmetic", alpha=0.4, device="cpu")
        for name in tvs.param_names:
            torch.testing.assert_close(crumbs[name], ta[name], rtol=0, atol=0)


def test_breadcrumbs_keeps_the_middle_of_each_ranking():
    # magnitudes 1 … 10 in a scrambled order with mixed signs
    a = torch.tensor([3., -9, 1, 10, -5, 7, -2, 8, 4, -6])
    b = torch.tensor([-10., 2, 6, -1, 9, -3, 5, 8, -7, 4])
    tvs = exact_set({"a": {"w": a}, "b": {"w": b}})

    def kept(v, lo, hi):   # entries with lo ≤ |v| ≤ hi
        return torch.where((v.abs() >= lo) & (v.abs() <= hi), v, torch.zeros_like(v))

    # density 0.7, gamma 0.1: drop the top 1 and the bottom 10 − 7 − 1 = 2
    out = merge(tvs, "breadcrumbs", density=0.7, gamma=0.1, alpha=1.0, device="cpu")["w"]
    torch.testing.assert_close(out, kept(a, 3, 9) + kept(b, 3, 9), rtol=0, atol=0)
    # gamma = 0: nothing is an outlier; the top of the ranking stays (mergekit's [n:-0] slice would keep nothing)
    out = merge(tvs, "breadcrumbs", density=0.5, gamma=0.0, alpha=1.0, device="cpu")["w"]
    torch.testing.assert_close(out, kept(a, 6, 10) + kept(b, 6, 10), rtol=0, atol=0)
    # gamma > 1 − density: fewer outliers go, so that exactly ⌊0.9 · 10⌋ = 9 stay
    out = merge(tvs, "breadcrumbs", density=0.9, gamma=0.3, alpha=0.5, device="cpu")["w"]
    torch.testing.assert_close(out, 0.5 * (kept(a, 1, 9) + kept(b, 1, 9)), rtol=0, atol=0)


# ---------------------------------------------------------------- DELLA
def test_della_without_drop_is_ties_elect_and_mean():
    tvs = random_set(n_tasks=3)
    della = merge(tvs, "della", density=1.0, alpha=0.7, device="cpu")
    ties = merge(tvs, "ties", density=1.0, alpha=0.7, device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(della[name], ties[name], rtol=0, atol=0)


def test_magprune_keeps_by_rank_with_the_declared_probabilities():
    row = torch.tensor([[0.3, -0.5, 0.1, 0.4, -0.2]])             # ranks 2, 4, 0, 3, 1
    prob = keep_probabilities(row[:, None, :], 0.5, 0.2)[0, 0]
    torch.testing.assert_close(prob, torch.tensor([0.5, 0.7, 0.3, 0.6, 0.4]))
    # a row 1000× larger and reversed gets the same probabilities by its own ranking
    two = torch.stack([row[0], 1000 * row[0].flip(0)])[None]
    probs = keep_probabilities(two, 0.5, 0.2)[0]
    torch.testing.assert_close(probs[1], probs[0].flip(0))
    # over 2000 seeds: keep frequencies match, and each entry keeps its expectation (kept ones ÷ p)
    n = 2000
    draws = torch.stack([magprune(row, 0.5, 0.2, seed, "w")[0] for seed in range(n)])
    kept = (draws != 0).double().mean(0)
    assert (kept - prob.double()).abs().max() < 0.05                # binomial σ ≤ 0.011
    assert all(v == 0.0 or v == pytest.approx(-0.5 / 0.7) for v in torch.unique(draws[:, 1]).tolist())
    assert (draws.double().mean(0) - row[0].double()).abs().max() < 0.06
    # the same seed, the same mask; parameter name and seed both change it
    torch.testing.assert_close(magprune(row, 0.5, 0.2, 7, "w"), magprune(row, 0.5, 0.2, 7, "w"), rtol=0, atol=0)
    big = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(magprune(big, 0.5, 0.2, 7, "w"), magprune(big, 0.5, 0.2, 8, "w"))
    assert not torch.equal(magprune(big, 0.5, 0.2, 7, "w"), magprune(big, 0.5, 0.2, 7, "v"))


def test_della_hand_computed_elect_and_mean():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    tvs = exact_set({"a": {"w": a}, "b": {"w": b}})
    d, e, seed, alpha = 0.5, 0.2, 11, 0.8
    dropped = magprune(torch.stack([a, b]), d, e, seed, "w")
    expected = torch.zeros(3, 6)
    for i in range(3):
        for j in range(6):
            x, y = float(dropped[0, i, j]), float(dropped[1, i, j])
            sign = math.copysign(1.0, x + y) if x + y != 0 else 0.0
            agree = [v for v in (x, y) if v != 0 and math.copysign(1.0, v) == sign]
            expected[i, j] = sum(agree) / len(agree) if agree else 0.0
    out = merge(tvs, "della", density=d, epsilon=e, seed=seed, alpha=alpha, device="cpu")["w"]
    torch.testing.assert_close(out, alpha * expected, rtol=1e-6, atol=1e-7)
    # rows are ranked on their own: the kept entries were divided by their probability
    nz = dropped[0] != 0
    prob = keep_probabilities(a[None], d, e)[0]
    torch.testing.assert_close(dropped[0][nz], (a / prob)[nz])


def test_della_refuses_probabilities_outside_0_1_naming_both_knobs():
    tvs = random_set(n_tasks=2)
    with pytest.raises(HyperparameterError, match="density=0.9.*epsilon=0.15"):
        merge(tvs, "della", density=0.9, device="cpu")
    with pytest.raises(HyperparameterError, match="density=0.3.*epsilon=0.3"):
        merge(tvs, "della", density=0.3, epsilon=0.3, device="cpu")
    merge(tvs, "della", density=1.0, epsilon=0.45, device="cpu")      # density 1 drops nothing: no constraint


# ---------------------------------------------------------------- Model Stock
def test_model_stock_identical_task_vectors_give_their_mean():
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    tvs = exact_set({t: {"w": v.clone()} for t in ("a", "b", "c")})
    torch.testing.assert_close(merge(tvs, "model_stock", device="cpu")["w"], v, rtol=1e-6, atol=1e-7)


def test_model_stock_orthogonal_pair_gives_the_base_and_known_angles_give_t():
    a = torch.tensor([1., 0, 0]); b = torch.tensor([0., 2, 0])
    out = merge(exact_set({"a": {"w": a}, "b": {"w": b}}), "model_stock", device="cpu")["w"]
    torch.testing.assert_close(out, torch.zeros(3), rtol=0, atol=0)
    # three vectors with every pairwise cosine 1/2: t = 3·½ / (1 + 2·½) = 0.75
    vs = [torch.tensor([1., 1, 0]), torch.tensor([0., 2, 2]), torch.tensor([3., 0, 3])]
    tvs = exact_set({f"t{i}": {"w": v} for i, v in enumerate(vs)})
    out = merge(tvs, "model_stock", alpha=2.0, device="cpu")["w"]
    torch.testing.assert_close(out, 2.0 * 0.75 * torch.stack(vs).mean(0), rtol=1e-6, atol=1e-6)


def test_model_stock_filter_wise_takes_one_angle_per_row():
    same = torch.tensor([1., 2, 3])
    a = torch.stack([same, torch.tensor([1., 0, 0])])
    b = torch.stack([same, torch.tensor([0., 1, 0])])
    tvs = exact_set({"a": {"w": a}, "b": {"w": b}})
    out = merge(tvs, "model_stock", filter_wise=True, device="cpu")["w"]
    torch.testing.assert_close(out, torch.stack([same, torch.zeros(3)]), rtol=1e-6, atol=1e-7)
    # per tensor: one cosine (15/16) for the whole matrix
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    t = 2 * cos / (1 + cos)
    whole = merge(tvs, "model_stock", device="cpu")["w"]
    torch.testing.assert_close(whole, t * (a + b) / 2, rtol=1e-6, atol=1e-7)


def test_model_stock_needs_two_tasks_and_treats_zero_vectors_as_orthogonal():
    with pytest.raises(HyperparameterError, match="at least 2"):
        merge(exact_set({"a": {"w": torch.ones(3)}}), "model_stock", device="cpu")
    tvs = exact_set({"a": {"w": torch.tensor([1., 2, 3])}, "b": {"w": torch.zeros(3)}})
    torch.testing.assert_close(merge(tvs, "model_stock", device="cpu")["w"], torch.zeros(3), rtol=0, atol=0)
    # small deltas keep their exact angle (mergekit's 1e-6 clamp on |τ_i||τ_j| would shrink it)
    tiny = exact_set({t: {"w": 1e-5 * torch.tensor([1., 2, 3])} for t in ("a", "b")})
    torch.testing.assert_close(merge(tiny, "model_stock", device="cpu")["w"], 1e-5 * torch.tensor([1., 2, 3]))


# ---------------------------------------------------------------- Karcher mean
def test_karcher_of_two_equal_norm_task_vectors_is_the_slerp_midpoint():
    g = torch.Generator().manual_seed(2)
    first = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    second = {k: v.norm() * (u := torch.randn(v.shape, generator=g)) / u.norm() for k, v in first.items()}
    tvs = exact_set({"a": first, "b": second})
    karcher = merge(tvs, "karcher", alpha=1.5, device="cpu")
    slerp = merge(tvs, "slerp", t=0.5, alpha=1.5, device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(karcher[name], slerp[name], rtol=1e-5, atol=1e-6)


def test_karcher_takes_the_mean_norm_on_the_mean_direction():
    a = torch.tensor([3., 0, 0]); b = torch.tensor([0., 1, 0])
    out = merge(exact_set({"a": {"w": a}, "b": {"w": b}}), "karcher", device="cpu")["w"]
    torch.testing.assert_close(out, 2.0 * torch.tensor([1., 1, 0]) / math.sqrt(2), rtol=1e-6, atol=1e-7)
    # identical directions: that direction; identical vectors: that vector
    v = torch.tensor([1., -2, 2])
    out = merge(exact_set({"a": {"w": v}, "b": {"w": 3 * v}, "c": {"w": 2 * v}}), "karcher", device="cpu")["w"]
    torch.testing.assert_close(out, 2 * v, rtol=1e-6, atol=1e-6)
    out = merge(exact_set({"a": {"w": v}, "b": {"w": v.clone()}}), "karcher", device="cpu")["w"]
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)
    # a zero task vector adds no direction but counts, as 0, in the mean norm
    out = merge(exact_set({"a": {"w": v}, "b": {"w": torch.zeros(3)}}), "karcher", device="cpu")["w"]
    torch.testing.assert_close(out, v / 2, rtol=1e-6, atol=1e-7)


def test_karcher_of_a_symmetric_cone_is_its_axis():
    phi = 0.7
    vs = [torch.tensor([math.sin(phi) * math.cos(a), math.sin(phi) * math.sin(a), math.cos(phi)]) * s
          for a, s in zip((0.3, 0.3 + 2 * math.pi / 3, 0.3 + 4 * math.pi / 3), (1.0, 2.0, 3.0))]
    out = merge(exact_set({f"t{i}": {"w": v} for i, v in enumerate(vs)}), "karcher", max_iter=50, tol=0.0,
                device="cpu")["w"]
    torch.testing.assert_close(out, torch.tensor([0., 0, 2.0]), rtol=1e-6, atol=1e-6)


def test_karcher_satisfies_the_first_order_condition():
    """At the Karcher mean u the mean log map Σ θ_t/sinθ_t (û_t − cosθ_t u) vanishes."""
    g = torch.Generator().manual_seed(9)
    vs = [torch.randn(40, generator=g, dtype=torch.float64) + 1.5 for _ in range(5)]
    tvs = exact_set({f"t{i}": {"w": v.float()} for i, v in enumerate(vs)})
    out = merge(tvs, "karcher", max_iter=200, tol=0.0, device="cpu")["w"].double()
    u = out / out.norm()
    grad = torch.zeros(40, dtype=torch.float64)
    for v in vs:
        unit = v.float().double() / v.float().double().norm()
        cos = float((unit @ u).clamp(-1, 1))
        theta = math.acos(cos)
        grad += theta / math.sin(theta) * (unit - cos * u)
    assert float(grad.norm()) < 1e-5
    # few steps from the normalised arithmetic mean are not yet there, but close
    early = merge(tvs, "karcher", max_iter=1, tol=0.0, device="cpu")["w"].double()
    assert float((early / early.norm() - u).norm()) < 1e-2
    assert out.norm() == pytest.approx(sum(float(v.float().norm()) for v in vs) / 5, rel=1e-6)


@pytest.mark.parametrize("name", ["breadcrumbs", "della", "model_stock", "karcher"])
def test_alpha_is_a_plain_scale(name):
    """benchmarks/demo_table.py tunes these methods' α by scaling one merge at α = 1."""
    tvs = random_set(n_tasks=3)
    one = merge(tvs, name, alpha=1.0, device="cpu")
    scaled = merge(tvs, name, alpha=1.7, device="cpu")
    for p in tvs.param_names:
        torch.testing.assert_close(scaled[p], 1.7 * one[p], rtol=1e-6, atol=1e-8)
