"""Merging methods against answers known by construction or worked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.errors import HyperparameterError
from analysis.merging import METHODS, get_method, merge
from analysis.merging.inputs import MergeInputs
from analysis.merging.iso import split_rank
from analysis.merging.tsv import tsv_rank
from analysis.spectra import SpectralCache
from analysis.taskvectors import TaskVectorSet

CPU = torch.device("cpu")


def make_set(deltas: dict[str, dict[str, torch.Tensor]], seed: int = 0) -> TaskVectorSet:
    """A set whose task deltas are exactly `deltas` ({task: {name: tensor}})."""
    g = torch.Generator().manual_seed(seed)
    first = next(iter(deltas.values()))
    base = {k: torch.randn(v.shape, generator=g, dtype=torch.float64).float() for k, v in first.items()}
    # float64 arithmetic then exact float32 deltas: store base + delta so that (ft - base) == delta
    fts = {t: {k: base[k] + d[k] for k in d} for t, d in deltas.items()}
    tvs = TaskVectorSet.from_state_dicts(base, fts)
    return tvs


def exact_set(deltas):
    """Base of zeros: fine-tuned minus base is the delta bit for bit."""
    first = next(iter(deltas.values()))
    base = {k: torch.zeros(v.shape) for k, v in first.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: v.clone() for k, v in d.items()} for t, d in deltas.items()})


def random_set(n_tasks=3, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"blocks.0.attn.weight": (12, 20), "blocks.0.attn.bias": (12,),
                        "blocks.1.mlp.weight": (30, 10), "blocks.1.conv.weight": (6, 4, 3, 3),
                        "embed.weight": (15, 6), "norm.weight": (10,)}
    deltas = {f"t{i}": {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()} for i in range(n_tasks)}
    return exact_set(deltas)


def orthogonal_blocks(n: int, n_blocks: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return [q[:, i * width:(i + 1) * width] for i in range(n_blocks)]


# ---------------------------------------------------------------- basic
def test_task_arithmetic_on_orthogonal_task_vectors_is_their_sum():
    # disjoint supports: the task vectors are mutually orthogonal
    a = torch.zeros(6, 4); a[:3] = torch.arange(12.).reshape(3, 4) + 1
    b = torch.zeros(6, 4); b[3:] = -(torch.arange(12.).reshape(3, 4) + 1)
    tvs = exact_set({"a": {"w": a}, "b": {"w": b}})
    assert float((a * b).sum()) == 0.0
    out = merge(tvs, "task_arithmetic", alpha=1.0, device="cpu")
    torch.testing.assert_close(out["w"], a + b, rtol=0, atol=0)
    out = merge(tvs, "task_arithmetic", alpha=0.3, device="cpu")
    torch.testing.assert_close(out["w"], 0.3 * (a + b))


def test_weight_averaging_is_the_mean():
    tvs = random_set()
    out = merge(tvs, "weight_averaging", device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(out[name], tvs.deltas(name).mean(0))


# ---------------------------------------------------------------- TIES
def test_ties_hand_worked_example():
    # density 0.5 of 6 entries: each task keeps its 3 largest magnitudes.
    #   τ1 = [ 5, -1,  4,  0.5, -3, 0.2] -> trimmed [ 5, 0, 4, 0, -3, 0]
    #   τ2 = [ 2,  6, -1, -0.4,  7, 0.1] -> trimmed [ 2, 6, 0, 0,  7, 0]
    #   τ3 = [-8,  1,  3,  0.3, -2, 9  ] -> trimmed [-8, 0, 3, 0,  0, 9]
    # sum of trimmed = [-1, 6, 7, 0, 4, 9] -> elected signs [-, +, +, 0, +, +]
    # disjoint mean of the kept values that agree with the elected sign:
    #   e0: only -8 agrees (two positives lose to magnitude)  -> -8
    #   e1: 6 -> 6;  e2: (4 + 3) / 2 = 3.5;  e3: nothing kept -> 0;  e4: 7 (the -3 disagrees);  e5: 9
    # merged = [-8, 6, 3.5, 0, 7, 9]; α = 0.5 -> [-4, 3, 1.75, 0, 3.5, 4.5]
    tvs = exact_set({"t1": {"w": torch.tensor([5., -1, 4, 0.5, -3, 0.2])},
                     "t2": {"w": torch.tensor([2., 6, -1, -0.4, 7, 0.1])},
                     "t3": {"w": torch.tensor([-8., 1, 3, 0.3, -2, 9])}})
    out = merge(tvs, "ties", density=0.5, alpha=0.5, device="cpu")
    torch.testing.assert_close(out["w"], torch.tensor([-4., 3, 1.75, 0, 3.5, 4.5]))


def test_ties_trims_over_the_whole_model_or_per_parameter():
    # one task, two tensors [10, 9] and [1, 2], density 0.5 -> keep 2 of 4 entries
    tvs = exact_set({"t": {"a": torch.tensor([10., 9.]), "b": torch.tensor([1., 2.])}})
    whole = merge(tvs, "ties", density=0.5, alpha=1.0, scope="model", device="cpu")
    torch.testing.assert_close(whole["a"], torch.tensor([10., 9.]))
    torch.testing.assert_close(whole["b"], torch.tensor([0., 0.]))
    per = merge(tvs, "ties", density=0.5, alpha=1.0, scope="parameter", device="cpu")
    torch.testing.assert_close(per["a"], torch.tensor([10., 0.]))
    torch.testing.assert_close(per["b"], torch.tensor([0., 2.]))


# ---------------------------------------------------------------- DARE
def test_dare_with_no_drop_equals_its_base_rule():
    tvs = random_set()
    for base, knobs in (("task_arithmetic", {"alpha": 0.4}), ("ties", {"alpha": 0.7, "density": 0.3})):
        dare = merge(tvs, "dare", drop_rate=0.0, base=base, seed=123, device="cpu", **knobs)
        ref = merge(tvs, base, device="cpu", **knobs)
        for name in tvs.param_names:
            torch.testing.assert_close(dare[name], ref[name], rtol=0, atol=0)


def test_dare_preserves_the_expectation_over_seeds():
    # E[drop-and-rescale(τ)] = τ, so the mean over seeds of DARE-TA tends to TA.
    # Seeds 0..N-1 are fixed, so the test is deterministic; the bound is 6 standard
    # errors of the per-entry mean (std of one draw: sqrt(p/(1-p)·Σ_t τ_t²)).
    torch.manual_seed(0)
    tvs = exact_set({t: {"w": torch.randn(8, 10)} for t in ("a", "b", "c")})
    p, alpha, n_seeds = 0.5, 1.0, 300
    ta = merge(tvs, "task_arithmetic", alpha=alpha, device="cpu")["w"]
    mean = sum(merge(tvs, "dare", drop_rate=p, alpha=alpha, seed=s, device="cpu")["w"] for s in range(n_seeds)) / n_seeds
    sd = (p / (1 - p) * (tvs.deltas("w") ** 2).sum(0)).sqrt() * alpha / math.sqrt(n_seeds)
    assert bool(((mean - ta).abs() <= 6 * sd + 1e-6).all())
    # and the drop is real: one draw differs from TA, about a fraction p of entries is dropped
    one = merge(tvs, "dare", drop_rate=p, alpha=alpha, seed=7, device="cpu")["w"]
    assert not torch.allclose(one, ta)
    tv1 = exact_set({"a": {"w": torch.ones(100, 100)}})
    kept = float((merge(tv1, "dare", drop_rate=0.3, alpha=1.0, seed=1, device="cpu")["w"] != 0).float().mean())
    assert abs(kept - 0.7) < 0.02   # 10,000 Bernoulli(0.7): sd 0.0046


def test_dare_is_reproducible_by_seed():
    tvs = random_set()
    a = merge(tvs, "dare", drop_rate=0.6, seed=3, device="cpu")
    b = merge(tvs, "dare", drop_rate=0.6, seed=3, device="cpu")
    c = merge(tvs, "dare", drop_rate=0.6, seed=4, device="cpu")
    name = tvs.param_names[0]
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


# ---------------------------------------------------------------- consensus
def test_consensus_hand_worked_example():
    # λ = 1, total = [4, 0.25, 2]
    #   m1: |3| ≥ |4-3|=1 ✓   0.15 ≥ |0.25-0.15|=0.1 ✓   |-2| ≥ |2+2|=4 ✗
    #   m2: |1| ≥ 3 ✗          0.2 ≥ 0.05 ✓               2 ≥ 0 ✓
    #   m3: 0 ≥ 4 ✗            0.1 ≥ 0.35 ✗               2 ≥ 0 ✓
    # counts [1, 2, 2]; k = 2 keeps entries 1 and 2 -> α·[0, 0.25, 2]; k = 1 keeps all
    tvs = exact_set({"a": {"w": torch.tensor([3., 0.15, -2])}, "b": {"w": torch.tensor([1., 0.2, 2])},
                     "c": {"w": torch.tensor([0., -0.1, 2])}})
    out = merge(tvs, "consensus", tall_lambda=1.0, agreement=2, alpha=0.5, device="cpu")
    torch.testing.assert_close(out["w"], 0.5 * torch.tensor([0., 0.25, 2]))
    out = merge(tvs, "consensus", tall_lambda=1.0, agreement=1, alpha=0.5, device="cpu")
    torch.testing.assert_close(out["w"], 0.5 * torch.tensor([4., 0.25, 2]))
    with pytest.raises(HyperparameterError, match="agreement"):
        merge(tvs, "consensus", agreement=4, device="cpu")


# ---------------------------------------------------------------- TSV
def orthogonal_subspace_set(n_tasks=3, m=12, n=15, q=4, seed=0):
    """Tasks τ_t = U_t S_t V_tᵀ of rank q with mutually orthogonal U_t's and V_t's."""
    us = orthogonal_blocks(m, n_tasks, q, seed)
    vs = orthogonal_blocks(n, n_tasks, q, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    deltas = {}
    for t in range(n_tasks):
        s = torch.sort(torch.rand(q, generator=g, dtype=torch.float64) + 0.5, descending=True).values
        deltas[f"t{t}"] = {"blocks.0.w": (us[t] * s) @ vs[t].T, "blocks.0.b": torch.randn(m, generator=g).double()}
    return exact_set({t: {k: v.float() for k, v in d.items()} for t, d in deltas.items()})


def test_tsv_m_on_orthogonal_subspaces_equals_task_arithmetic():
    tvs = orthogonal_subspace_set()          # r = 12, T = 3, each task rank 4 = ⌊12/3⌋
    for alpha in (1.0, 0.7):
        out = merge(tvs, "tsv_m", rank_fraction=1 / 3, alpha=alpha, device="cpu")
        ta = merge(tvs, "task_arithmetic", alpha=alpha, device="cpu")
        torch.testing.assert_close(out["blocks.0.w"], ta["blocks.0.w"], rtol=1e-5, atol=1e-5)
        # vector parameters: α × mean
        torch.testing.assert_close(out["blocks.0.b"], alpha * tvs.deltas("blocks.0.b").mean(0))


def test_tsv_m_overflow_cap_and_polar():
    tvs = random_set(n_tasks=3)
    assert tsv_rank(0.5, 12, 3, "cap") == 4 and tsv_rank(0.5, 12, 3, "polar") == 6
    cache = SpectralCache(tvs, persist=False)
    capped = merge(tvs, "tsv_m", rank_fraction=0.5, overflow="cap", cache=cache, device="cpu")
    at_one_over_t = merge(tvs, "tsv_m", rank_fraction=1 / 3, cache=cache, device="cpu")
    wide = merge(tvs, "tsv_m", rank_fraction=0.5, overflow="polar", cache=cache, device="cpu")
    name = "blocks.0.attn.weight"   # 12 × 20, r = 12: T·⌊0.5·12⌋ = 18 > 12
    torch.testing.assert_close(capped[name], at_one_over_t[name])
    assert not torch.allclose(wide[name], capped[name])
    assert torch.isfinite(wide[name]).all()


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_polar_solvers_agree_within_1e_4(method):
    tvs = random_set(n_tasks=4)
    cache = SpectralCache(tvs, persist=False)
    exact = merge(tvs, method, cache=cache, device="cpu", polar="exact")
    for solver in ("gram", "newton_schulz"):
        fast = merge(tvs, method, cache=cache, device="cpu", polar=solver)
        for name in tvs.param_names:
            rel = float((fast[name] - exact[name]).norm() / exact[name].norm())
            assert rel <= 1e-4, (solver, name, rel)


def test_tsv_c_is_each_tasks_truncated_svd():
    tvs = random_set(n_tasks=2)
    out = merge(tvs, "tsv_c", rank_fraction=0.25, device="cpu")
    assert out.per_task and out.tasks == tvs.tasks
    w = tvs.delta("t0", "blocks.0.attn.weight").double()   # 12 × 20 -> rank 3
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(out.for_task("t0")["blocks.0.attn.weight"].double(), best, rtol=1e-4, atol=1e-5)
    full = merge(tvs, "tsv_c", rank_fraction=1.0, device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(full.for_task("t1")[name], tvs.delta("t1", name), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Iso
def test_iso_c_has_a_flat_spectrum_and_the_span_of_the_sum():
    # two rank-2 tasks in 10 × 8: the sum has rank 4, so "same span" is not trivial
    g = torch.Generator().manual_seed(0)
    deltas = {t: {"w": torch.randn(10, 2, generator=g) @ torch.randn(2, 8, generator=g)} for t in ("a", "b")}
    tvs = exact_set(deltas)
    total = tvs.deltas("w").sum(0).double()
    out = merge(tvs, "iso_c", alpha=0.8, device="cpu")["w"].double()
    s_sum = torch.linalg.svdvals(total)
    s_out = torch.linalg.svdvals(out)
    flat = 0.8 * s_sum[:4].mean()
    torch.testing.assert_close(s_out[:4], flat.expand(4), rtol=1e-5, atol=1e-6)
    assert float(s_out[4:].max()) < 1e-5 * float(flat)
    u_sum = torch.linalg.svd(total)[0][:, :4]
    u_out = torch.linalg.svd(out)[0][:, :4]
    torch.testing.assert_close(u_out @ u_out.T, u_sum @ u_sum.T, rtol=0, atol=1e-5)
    v_sum = torch.linalg.svd(total)[2][:4]
    v_out = torch.linalg.svd(out)[2][:4]
    torch.testing.assert_close(v_out.T @ v_out, v_sum.T @ v_sum, rtol=0, atol=1e-5)


def test_iso_c_full_rank_spectrum_is_flat():
    tvs = random_set()
    out = merge(tvs, "iso_c", alpha=1.0, device="cpu")["blocks.1.mlp.weight"].double()   # 30 × 10
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, s.mean().expand_as(s), rtol=1e-5, atol=0)
    s_sum = torch.linalg.svdvals(tvs.deltas("blocks.1.mlp.weight").sum(0).double())
    torch.testing.assert_close(s.mean(), s_sum.mean(), rtol=1e-5, atol=0)


def test_iso_cts_with_c_1_is_iso_c():
    tvs = random_set()
    cts = merge(tvs, "iso_cts", common_fraction=1.0, alpha=1.3, device="cpu")
    iso = merge(tvs, "iso_c", alpha=1.3, device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(cts[name], iso[name], rtol=1e-5, atol=1e-6)


def test_iso_cts_split_and_flat_spectrum():
    assert split_rank(768, 8, 0.8) == (616, 19)   # int(614.4) = 614, round(154/8) = 19, 768 - 152 = 616
    assert split_rank(10, 3, 0.5) == (4, 2)       # int(5), round(5/3) = 2, 10 - 6 = 4
    assert split_rank(10, 3, 0.0) == (1, 3)       # round(10/3) = 3: 1 common direction
    assert split_rank(10, 3, 0.5, "exact_fill") == (7, 1)   # (10-5)//3 = 1, 10 - 3 = 7
    tvs = random_set(n_tasks=3)
    for c in (0.0, 0.5, 0.8):
        out = merge(tvs, "iso_cts", common_fraction=c, alpha=1.0, device="cpu")
        for name in ("blocks.0.attn.weight", "blocks.1.mlp.weight"):
            s = torch.linalg.svdvals(out[name].double())
            torch.testing.assert_close(s, s.mean().expand_as(s), rtol=1e-4, atol=0)


def naive_iso_cts(taus: torch.Tensor, c: float, alpha: float) -> torch.Tensor:
    """The definition, step by step, in float64 with SVDs from scratch."""
    taus = taus.double()
    t, m, n = taus.shape
    r = min(m, n)
    common, k = split_rank(r, t, c)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for i in range(t):
        resid = taus[i] - u[:, :common] @ (u[:, :common].T @ taus[i])
        ru, rs, rvh = torch.linalg.svd(resid, full_matrices=False)
        us.append(ru[:, :k]); ss.append(rs[:k]); vhs.append(rvh[:k])
    pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    pv, _, qv = torch.linalg.svd(torch.cat(vhs, 0), full_matrices=False)
    return alpha * torch.cat(ss).mean() * (pu @ qu) @ (pv @ qv)


def test_iso_cts_matches_the_definition_computed_from_scratch():
    tvs = random_set(n_tasks=3)
    for c in (0.3, 0.8):
        out = merge(tvs, "iso_cts", common_fraction=c, alpha=0.9, device="cpu", polar="exact")
        for name in ("blocks.0.attn.weight", "blocks.1.mlp.weight"):     # wide and tall
            ref = naive_iso_cts(tvs.deltas(name), c, 0.9)
            rel = float((out[name].double() - ref).norm() / ref.norm())
            assert rel <= 1e-5, (c, name, rel)


def test_iso_cts_task_part_matches_a_direct_svd():
    # the cached-factor route (small SVD for m ≤ n, float64 Gram for m > n) must give what
    # recomputing (I - U_c U_cᵀ) τ_t's SVD from scratch gives
    from analysis.merging.iso import projected_top
    g = torch.Generator().manual_seed(5)
    for m, n in ((9, 14), (14, 9), (10, 10)):
        taus = torch.randn(3, m, n, generator=g)
        u_t, s_t, vh_t = torch.linalg.svd(taus, full_matrices=False)
        u_sum = torch.linalg.svd(taus.sum(0), full_matrices=False)[0]
        common, k = 4, 2
        x, sig, yh = projected_top(u_t, s_t, vh_t, u_sum, common, k)
        u_c = u_sum[:, :common]
        resid = taus - u_c @ (u_c.T @ taus)
        rx, rs, ryh = torch.linalg.svd(resid.double(), full_matrices=False)
        torch.testing.assert_close(sig.double(), rs[:, :k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(((x * sig[:, None, :]) @ yh).double(),
                                   (rx[:, :, :k] * rs[:, None, :k]) @ ryh[:, :k], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- slerp
def test_slerp_two_tasks_only_and_known_points():
    a = torch.tensor([1., 0, 0]); b = torch.tensor([0., 2, 0])
    tvs = exact_set({"a": {"w": a}, "b": {"w": b}})
    torch.testing.assert_close(merge(tvs, "slerp", t=0.0, device="cpu")["w"], a)
    torch.testing.assert_close(merge(tvs, "slerp", t=1.0, device="cpu")["w"], b)
    half = merge(tvs, "slerp", t=0.5, alpha=2.0, device="cpu")["w"]   # θ = 90°: sin45°·(a + b)
    torch.testing.assert_close(half, 2.0 * math.sin(math.pi / 4) * (a + b))
    with pytest.raises(HyperparameterError, match="exactly 2"):
        merge(random_set(n_tasks=3), "slerp", device="cpu")


# ---------------------------------------------------------------- knobs and cache
def test_every_method_rejects_out_of_range_knobs_naming_them():
    tvs2, tvs3 = random_set(n_tasks=2), random_set(n_tasks=3)
    checked = 0
    for name, method in METHODS.items():
        tvs = tvs2 if method.needs.max_tasks == 2 else tvs3
        with pytest.raises(HyperparameterError, match="not_a_knob"):
            merge(tvs, name, not_a_knob=1, device="cpu")
        for hp in method.hyperparameters:
            bad = []
            if hp.type in ("float", "int"):
                bad = [hp.high + 1, hp.low - 1, "abc"]
            elif hp.type == "choice":
                bad = ["no-such-choice"]
            elif hp.type == "bool":
                bad = ["maybe"]
            for value in bad:
                with pytest.raises(HyperparameterError, match=rf"'{hp.name}'") as err:
                    merge(tvs, name, device="cpu", **{hp.name: value})
                assert str(value) in str(err.value)
                checked += 1
    assert checked >= 25
    with pytest.raises(HyperparameterError, match="no_such_method"):
        merge(tvs3, "no_such_method")


def test_declarations_are_complete():
    for name, method in METHODS.items():
        assert method.name == name and method.summary
        for hp in method.hyperparameters:
            assert hp.help, (name, hp.name)
            if hp.type in ("float", "int"):
                assert hp.low is not None and hp.high is not None and hp.step
                assert hp.low <= hp.default_for(8) <= hp.high
    assert get_method("tsv_m").defaults(8)["rank_fraction"] == pytest.approx(1 / 8)


def test_rank_fraction_changes_reuse_the_cache():
    tvs = random_set(n_tasks=3)
    cache = SpectralCache(tvs, persist=False)
    merge(tvs, "tsv_m", rank_fraction=0.2, cache=cache, device="cpu")
    count = cache.compute_count
    assert count > 0
    for f in (0.1, 0.3, 0.05):
        merge(tvs, "tsv_m", rank_fraction=f, alpha=1.5, cache=cache, device="cpu")
        merge(tvs, "tsv_c", rank_fraction=f, cache=cache, device="cpu")
    for c in (0.2, 0.6, 0.9):
        merge(tvs, "iso_cts", common_fraction=c, cache=cache, device="cpu")
    merge(tvs, "iso_c", alpha=0.5, cache=cache, device="cpu")
    merge(tvs, "iso_c", alpha=1.5, cache=cache, device="cpu")
    assert cache.compute_count == count


def test_alpha_change_reuses_the_unscaled_merge():
    tvs = random_set()
    cache = SpectralCache(tvs, persist=False)
    one = merge(tvs, "tsv_m", alpha=1.0, cache=cache, device="cpu")
    two = merge(tvs, "tsv_m", alpha=2.0, cache=cache, device="cpu")
    for name in tvs.param_names:
        torch.testing.assert_close(two[name], 2 * one[name])


def test_every_method_returns_finite_deltas_of_the_right_shapes():
    tvs3, tvs2 = random_set(n_tasks=3), random_set(n_tasks=2)
    for name, method in METHODS.items():
        tvs = tvs2 if method.needs.max_tasks == 2 else tvs3
        if method.unavailable(len(tvs.tasks), has_data=False):
            continue   # data-aware methods: tests/test_merging_contract.py runs every method with data
        out = merge(tvs, name, device="cpu")
        for _, delta in out.models():
            assert list(delta) == tvs.param_names
            for p, d in delta.items():
                assert tuple(d.shape) == tvs.shape(p) and d.dtype == torch.float32 and torch.isfinite(d).all()


def test_embeddings_excluded_by_default_get_the_vector_rule():
    tvs = random_set()
    out = merge(tvs, "tsv_m", alpha=0.6, device="cpu")
    torch.testing.assert_close(out["embed.weight"], 0.6 * tvs.deltas("embed.weight").mean(0))
    inc = merge(tvs, "tsv_m", alpha=0.6, include_embeddings=True, device="cpu")
    assert not torch.allclose(inc["embed.weight"], out["embed.weight"])


def test_tsv_m_gram_slices_match_the_exact_polar_at_every_rank():
    """The Gram route reads each rank's UᵀU, VᵀV as principal submatrices of the ones memoised at ⌊r/T⌋
    triplets per task; at every rank (and with a task repeated, so the Grams are singular and the SVD
    fallback runs) it is the exact-polar merge."""
    tvs = random_set(n_tasks=3, shapes={"blocks.0.w": (18, 24), "blocks.1.w": (30, 12), "blocks.1.b": (30,)})
    twin = exact_set({**{t: {n: tvs.delta(t, n) for n in tvs.param_names} for t in tvs.tasks},
                      "t0_again": {n: tvs.delta("t0", n) for n in tvs.param_names}})
    for s in (tvs, twin):
        cache = SpectralCache(s, persist=False)
        for f in (0.05, 0.15, 0.25, 1 / len(s.tasks), 0.6):
            exact = merge(s, "tsv_m", rank_fraction=f, cache=cache, device="cpu", polar="exact")
            gram = merge(s, "tsv_m", rank_fraction=f, cache=cache, device="cpu", polar="gram")
            for name in ("blocks.0.w", "blocks.1.w"):
                rel = float((gram[name] - exact[name]).norm() / exact[name].norm())
                assert rel <= 1e-5, (len(s.tasks), f, name, rel)


def test_iso_cts_common_fractions_with_the_same_rank_splits_are_one_merge_with_one_key():
    """An Iso-CTS merge depends on c only through (common, per task) per matrix rank: at ranks 12, 10, 6 and
    T = 3, c = 0.5 and 0.58 split all three alike, 0.6 splits rank 10 as 7 + 3·1 instead of 4 + 3·2. Each
    merge here is computed from scratch (no shared memo), so this checks the premise, not the cache."""
    tvs = random_set(n_tasks=3)
    spec = get_method("iso_cts")
    key = {c: spec.merge_key(spec.validate({"common_fraction": c}, 3), tvs) for c in (0.5, 0.58, 0.6)}
    assert key[0.5] == key[0.58] != key[0.6]
    fresh = {c: merge(tvs, "iso_cts", common_fraction=c, cache=SpectralCache(tvs, persist=False), device="cpu")
             for c in (0.5, 0.58, 0.6)}
    for name in tvs.param_names:
        torch.testing.assert_close(fresh[0.5][name], fresh[0.58][name], rtol=0, atol=0)
    assert any(not torch.allclose(fresh[0.5][n], fresh[0.6][n]) for n in tvs.param_names)


def test_tsv_m_fractions_above_the_cap_are_one_merge_with_one_key():
    tvs = random_set(n_tasks=3)                     # decomposed ranks 12, 10, 6 (conv 6 × 36)
    spec = get_method("tsv_m")
    above = [spec.validate({"rank_fraction": f}, 3) for f in (0.34, 0.5, 0.9)]
    assert len({spec.merge_key(p, tvs) for p in above}) == 1
    assert spec.merge_key(spec.validate({"rank_fraction": 0.2}, 3), tvs) != spec.merge_key(above[0], tvs)
    assert spec.note(above[0], tvs) is None and "4 of rank 12" in spec.note(above[1], tvs)   # 0.34: 3·⌊4.08⌋ = 12
    assert spec.note(spec.validate({"rank_fraction": 0.2}, 3), tvs) is None
    cache = SpectralCache(tvs, persist=False)
    first = merge(tvs, "tsv_m", rank_fraction=0.34, cache=cache, device="cpu")
    again = merge(tvs, "tsv_m", rank_fraction=0.9, cache=cache, device="cpu")
    for name in tvs.param_names:
        assert torch.equal(first[name], again[name])


def test_the_vector_rule_mean_is_kept_for_a_resident_set_and_never_scaled_in_place():
    tvs = random_set()
    tvs.keep_resident("cpu")
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    once = merge(inputs, "tsv_m", alpha=1.0)
    twice = merge(inputs, "tsv_m", rank_fraction=0.1, alpha=2.0)    # a new merge: the mean comes from the memo
    assert ("task_mean", "norm.weight", "cpu") in inputs.memo
    for name in ("norm.weight", "blocks.0.attn.bias"):
        torch.testing.assert_close(once[name], tvs.deltas(name).mean(0))
        torch.testing.assert_close(twice[name], 2 * tvs.deltas(name).mean(0))


def test_task_arithmetic_of_a_resident_set_reads_the_kept_sum():
    """α·Σ τ_t from the kept sum: an α move reads no task vector, the memo is never scaled in place, and
    every α is α × the sum, bit for bit."""
    tvs = random_set()
    tvs.keep_resident("cpu")
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    for a in (1.0, 0.3, 2.5):
        out = merge(inputs, "task_arithmetic", alpha=a)
        for name in tvs.param_names:
            torch.testing.assert_close(out[name], a * tvs.deltas(name).sum(0), rtol=0, atol=0)
    assert all(("task_sum", name, "cpu") in inputs.memo for name in tvs.param_names)
    reads = []
    real = inputs.deltas
    inputs.deltas = lambda name: reads.append(name) or real(name)
    merge(inputs, "task_arithmetic", alpha=0.7)
    assert reads == []


def test_iso_cts_on_a_resident_set_forms_v_stars_gram_from_the_sums_kept_gram_and_matches_the_definition():
    """On a resident set the Gram route takes V*'s common block V_cᵀV_c from the sum's kept Gram (one per
    matrix, for every c); square, wide and tall matrices still match the definition. In "blocks.9.proj.weight" every
    task has the same right singular vectors, so V* = [V_c, Y] is nearly singular: there taking V_cᵀV_c as I
    (the float32 V_c is orthonormal only to ~1e-7) moves the merge by 9e-4 at c = 0.3."""
    g = torch.Generator().manual_seed(3)
    v = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    shared = {f"t{t}": (torch.linalg.qr(torch.randn(16, 16, generator=g))[0] * torch.logspace(0, -1, 16)) @ v.T
              for t in range(3)}
    other = random_set(n_tasks=3, shapes={"sq.weight": (16, 16), "wide.weight": (12, 20), "tall.weight": (30, 10)})
    tvs = exact_set({t: {"blocks.9.proj.weight": shared[t], **{k: other.delta(t, k) for k in other.param_names}}
                     for t in shared})
    tvs.keep_resident("cpu")
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    for c in (0.3, 0.8, 0.5):
        out = merge(inputs, "iso_cts", common_fraction=c, alpha=0.9, polar="gram")
        for name in tvs.param_names:
            ref = naive_iso_cts(tvs.deltas(name), c, 0.9)
            rel = float((out[name].double() - ref).norm() / ref.norm())
            assert rel <= 1e-5, (c, name, rel)
    kept = [k for k in inputs.memo if isinstance(k, tuple) and k[0] == "iso_cts_sum_gram"]
    assert sorted(k[1] for k in kept) == sorted(tvs.param_names)


def test_iso_cts_with_memoised_projections_matches_the_definition():
    """A change of c reads the projected residuals from memoised projections (W_t = U_sumᵀU_tS_t and, for
    tall matrices, G_out = (U_tS_t)ᵀ(U_tS_t) − W_tᵀW_t); every c, wide and tall, still matches the definition."""
    tvs = random_set(n_tasks=3)
    inputs = MergeInputs(tvs, device="cpu", persist=False)
    for c in (0.0, 0.3, 0.8, 0.5):
        for topk in ("exact", "subspace"):
            out = merge(inputs, "iso_cts", common_fraction=c, alpha=0.9, topk=topk)
            for name in ("blocks.0.attn.weight", "blocks.1.mlp.weight"):     # wide and tall
                ref = naive_iso_cts(tvs.deltas(name), c, 0.9)
                rel = float((out[name].double() - ref).norm() / ref.norm())
                assert rel <= 1e-5, (c, topk, name, rel)
    assert any(isinstance(k, tuple) and k[0] == "iso_cts_projections" for k in inputs.memo)
