"""EpiMer against answers known by construction: the identity metric is the flat
subspace mean (task arithmetic in the task-vector subspace), equal metrics
give the flat mean, the subspace solve minimises a quadratic toy whose
Hessians are known, and the diagnostics vanish where they must.

Statistics are supplied by a MergeInputs subclass (no evaluator needed), so
these tests do not depend on the evaluator's data API."""
from __future__ import annotations

import pytest
import torch

from analysis.errors import ValidationError
from analysis.merging import METHODS, merge
from analysis.merging.epimer import (DIAGNOSTIC_COLUMNS, DIAGNOSTICS, apply_metric, diagnostics_wide,
                                     epimer_diagnostics, epimer_point, fisher_mass_table, kfac_input_metric,
                                     layer_diagnostics, orthonormal_basis, quadratic_loss, solve_layer,
                                     subspace_basis, vector_rule)
from analysis.merging.inputs import MergeInputs
from analysis.taskvectors import TaskVectorSet

F64 = torch.float64
SHAPES = {"blocks.0.attn.weight": (6, 5), "blocks.0.attn.bias": (6,), "blocks.1.mlp.weight": (4, 6),
          "blocks.1.conv.weight": (3, 2, 2, 2), "embed.weight": (7, 3), "norm.weight": (4,)}
LINEAR = ("blocks.0.attn.weight", "blocks.1.mlp.weight")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_set(n_tasks: int = 3, seed: int = 0, shapes=SHAPES) -> TaskVectorSet:
    """Base of zeros, so every delta is exactly the tensor given."""
    g = gen(seed)
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = {f"t{i}": {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()} for i in range(n_tasks)}
    return TaskVectorSet.from_state_dicts(base, fts)


def fishers_for(tvs, seed: int = 1, equal: bool = False, scale=None) -> dict:
    g = gen(seed)
    shared = {n: torch.rand(tvs.shape(n), generator=g) + 0.05 for n in tvs.param_names}
    out = {}
    for i, t in enumerate(tvs.tasks):
        s = 1.0 if scale is None else scale[i]
        out[t] = {n: s * (shared[n] if equal else torch.rand(tvs.shape(n), generator=g) ** 3) for n in tvs.param_names}
    return out


def grams_for(tvs, seed: int = 2, equal: bool = False) -> dict:
    g = gen(seed)
    out = {}
    shared = {}
    for n in LINEAR:
        x = torch.randn(20, tvs.shape(n)[1], generator=g, dtype=F64)
        shared[n] = x.T @ x
    for t in tvs.tasks:
        stats = {}
        for n in LINEAR:
            x = torch.randn(20, tvs.shape(n)[1], generator=g, dtype=F64) * torch.rand(tvs.shape(n)[1], generator=g,
                                                                                        dtype=F64)
            stats[n] = shared[n] * 20 if equal else x.T @ x
            stats[f"rows::{n}"] = torch.tensor(20.0 if equal else 10.0 + len(t), dtype=F64)
        out[t] = stats
    return out


class StatsInputs(MergeInputs):
    """MergeInputs whose statistics are given (no evaluator); counts how often they are asked for."""

    def __init__(self, tvs, fishers=None, grams=None):
        super().__init__(tvs, None, device="cpu", persist=False)
        self._fishers, self._grams, self.asked = fishers, grams, 0

    @property
    def has_data(self) -> bool:
        return True

    def require_data(self, method: str) -> None:
        pass

    def fisher(self, n=256, split="train", seed=0):
        self.asked += 1
        return self._fishers

    def activation_grams(self, n=256, split="train", seed=0):
        self.asked += 1
        return self._grams


def direct_loss(theta, taus, diag):
    """½ Σ_t (θ − τ_t)ᵀ diag(h_t) (θ − τ_t), computed in the full space."""
    e = theta[None, :] - taus
    return float(0.5 * (diag * e * e).sum())


# ---------------------------------------------------------------- (1) identity metric
def test_identity_metric_is_the_flat_subspace_mean():
    g = gen(0)
    taus = torch.randn(4, 30, generator=g, dtype=F64)
    basis = subspace_basis(taus)
    assert basis.shape == (30, 4)
    torch.testing.assert_close(epimer_point(taus, basis, None), taus.mean(0))     # the mean lies in the span
    # any subspace: the flat subspace mean B c̄ = projection of the mean
    other = orthonormal_basis(torch.randn(30, 3, generator=g, dtype=F64))
    torch.testing.assert_close(epimer_point(taus, other, None), other @ (other.T @ taus.mean(0)))
    low = subspace_basis(taus, rank=1, shape=(5, 6))
    assert low.shape == (30, 4)
    torch.testing.assert_close(epimer_point(taus, low, None), low @ (low.T @ taus.mean(0)))


@pytest.mark.parametrize("alpha", [0.3, 1.1])
def test_identity_merge_is_task_arithmetic_on_every_parameter(alpha):
    tvs = make_set()
    inputs = StatsInputs(tvs)
    out = merge(inputs, "epimer", metric="identity", alpha=alpha)
    ta = merge(inputs, "task_arithmetic", alpha=alpha)
    for name in tvs.param_names:
        torch.testing.assert_close(out[name], ta[name], rtol=1e-6, atol=1e-7)
    assert inputs.asked == 0                          # the identity metric reads no statistic


def test_rank_directions_with_identity_are_projected_task_arithmetic_and_reuse_the_spectra():
    tvs = make_set()
    inputs = StatsInputs(tvs)
    out = merge(inputs, "epimer", metric="identity", rank=1, alpha=1.0)
    cache = inputs.spectra(False)
    computed = cache.compute_count
    assert computed > 0
    for name in tvs.names_of_kind("matrix", "conv"):
        taus = tvs.deltas(name).double()
        m = taus.shape[1]
        mats = taus.reshape(3, m, -1)
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        gens = torch.stack([torch.outer(u[t, :, 0], vh[t, 0]).reshape(-1) for t in range(3)], 1)
        basis = orthonormal_basis(gens)
        expected = basis @ (basis.T @ taus.reshape(3, -1).sum(0))
        torch.testing.assert_close(out[name].reshape(-1).double(), expected, rtol=1e-4, atol=1e-6)
    merge(inputs, "epimer", metric="identity", rank=2, alpha=0.5)
    assert cache.compute_count == computed            # per-task SVDs come from the cache, once per set


# ---------------------------------------------------------------- (2) equal metrics
def test_equal_metrics_give_the_flat_mean_in_the_task_vector_subspace():
    g = gen(3)
    taus = torch.randn(3, 20, generator=g, dtype=F64)
    basis = subspace_basis(taus)
    h = torch.rand(20, generator=g, dtype=F64).expand(3, 20) + 0.1
    torch.testing.assert_close(epimer_point(taus, basis, h), taus.mean(0))
    grams = torch.randn(8, 5, generator=g, dtype=F64)
    kfac = kfac_input_metric((grams.T @ grams).expand(3, 5, 5), (4, 5))
    torch.testing.assert_close(epimer_point(taus, basis, kfac), taus.mean(0))


def test_equal_fishers_and_equal_grams_merge_to_task_arithmetic():
    tvs = make_set(seed=4)
    inputs = StatsInputs(tvs, fishers=fishers_for(tvs, equal=True), grams=grams_for(tvs, equal=True))
    ta = merge(inputs, "task_arithmetic", alpha=0.3)
    for metric in ("fisher", "kfac_input"):
        out = merge(inputs, "epimer", metric=metric, alpha=0.3)
        for name in tvs.param_names:
            torch.testing.assert_close(out[name], ta[name], rtol=1e-5, atol=1e-6, msg=f"{metric} {name}")


# ---------------------------------------------------------------- (3) quadratic toy with known Hessians
@pytest.mark.parametrize("subspace", ["task_vectors", "rank_one"])
def test_curvature_aware_solution_is_never_worse_than_the_flat_subspace_mean(subspace):
    worse = 0
    gains = []
    for seed in range(200):
        g = gen(seed)
        taus = torch.randn(3, 12, generator=g, dtype=F64)
        diag = torch.exp(2.0 * torch.randn(3, 12, generator=g, dtype=F64))     # very different curvatures
        basis = subspace_basis(taus) if subspace == "task_vectors" else subspace_basis(taus, 1, (3, 4))
        sol = solve_layer(taus, basis, diag)
        star = direct_loss(basis @ sol.c_star, taus, diag)
        flat = direct_loss(basis @ sol.c_flat, taus, diag)
        worse += star > flat * (1 + 1e-12)
        gains.append((flat - star) / flat)
        # the loss from the small quantities is the full-space loss
        residuals = torch.stack([(taus[t] - basis @ sol.coords[t]) @ (diag[t] * (taus[t] - basis @ sol.coords[t]))
                                 for t in range(3)])
        assert quadratic_loss(sol, residuals, sol.c_star) == pytest.approx(star, rel=1e-9)
        assert quadratic_loss(sol, residuals, sol.c_flat) == pytest.approx(flat, rel=1e-9)
    assert worse == 0
    assert max(gains) > 0.05                          # and it does help where curvatures differ


def test_kfac_solution_is_never_worse_on_a_quadratic_toy():
    for seed in range(50):
        g = gen(100 + seed)
        taus = torch.randn(3, 4 * 5, generator=g, dtype=F64)
        xs = [torch.randn(9, 5, generator=g, dtype=F64) * torch.exp(torch.randn(5, generator=g, dtype=F64))
              for _ in range(3)]
        grams = torch.stack([x.T @ x for x in xs])
        metric = kfac_input_metric(grams, (4, 5))
        full = [torch.kron(torch.eye(4, dtype=F64), grams[t]) for t in range(3)]

        def loss(theta):
            return float(sum(0.5 * (theta - taus[t]) @ full[t] @ (theta - taus[t]) for t in range(3)))
        basis = subspace_basis(taus)
        sol = solve_layer(taus, basis, metric)
        assert loss(basis @ sol.c_star) <= loss(basis @ sol.c_flat) * (1 + 1e-12)


def test_kfac_input_metric_is_identity_kron_gram_on_row_major_weights():
    g = gen(5)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    grams = torch.stack([x.T @ x, 2 * torch.eye(3, dtype=F64)])
    metric = kfac_input_metric(grams, (2, 3))
    vecs = torch.randn(6, 4, generator=g, dtype=F64)
    for t in range(2):
        explicit = torch.kron(torch.eye(2, dtype=F64), grams[t])
        torch.testing.assert_close(apply_metric(metric, t, vecs), explicit @ vecs)
        torch.testing.assert_close(apply_metric(metric, t, vecs[:, 0]), explicit @ vecs[:, 0])
    with pytest.raises(ValidationError, match="Grams of shape"):
        kfac_input_metric(grams, (2, 4))


def test_subspace_solution_is_the_true_minimiser_when_the_subspace_contains_it():
    for seed in range(20):
        g = gen(seed)
        taus = torch.randn(3, 10, generator=g, dtype=F64)
        diag = torch.exp(torch.randn(3, 10, generator=g, dtype=F64))
        best = (diag * taus).sum(0) / diag.sum(0)                          # argmin of Σ_t ½‖θ − τ_t‖²_{H_t}
        basis = orthonormal_basis(torch.cat([taus.T, best[:, None]], 1))  # a subspace that contains it
        torch.testing.assert_close(epimer_point(taus, basis, diag), best)
        wide = torch.randn(12, 10, generator=g, dtype=F64)                 # T ≥ D: the span is everything
        h = torch.exp(torch.randn(12, 10, generator=g, dtype=F64))
        torch.testing.assert_close(epimer_point(wide, subspace_basis(wide), h), (h * wide).sum(0) / h.sum(0))


# ---------------------------------------------------------------- solve details
def test_basis_drops_dependent_and_zero_task_vectors():
    g = gen(6)
    a, b = torch.randn(2, 15, generator=g, dtype=F64)
    taus = torch.stack([a, b, a + 2 * b, torch.zeros(15, dtype=F64)])
    basis = subspace_basis(taus)
    assert basis.shape == (15, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=F64))
    assert subspace_basis(torch.zeros(3, 15, dtype=F64)).shape == (15, 0)
    assert subspace_basis(torch.zeros(3, 15, dtype=F64), rank=2, shape=(3, 5)).shape == (15, 0)
    assert torch.equal(epimer_point(torch.zeros(3, 15, dtype=F64), subspace_basis(torch.zeros(3, 15, dtype=F64))),
                       torch.zeros(15, dtype=F64))


def test_directions_without_curvature_take_the_flat_mean():
    g = gen(7)
    taus = torch.randn(3, 8, generator=g, dtype=F64)
    basis = orthonormal_basis(torch.eye(8, dtype=F64)[:, :3])               # coordinates 0, 1, 2
    diag = torch.zeros(3, 8, dtype=F64)
    diag[0, 0], diag[1, 0], diag[2, 0] = 1.0, 3.0, 0.0                      # only coordinate 0 has curvature
    sol = solve_layer(taus, basis, diag)
    assert torch.isfinite(sol.c_star).all()
    assert float(sol.c_star[0]) == pytest.approx(float((taus[0, 0] + 3 * taus[1, 0]) / 4))
    torch.testing.assert_close(sol.c_star[1:], taus[:, 1:3].mean(0))
    torch.testing.assert_close(solve_layer(taus, basis, torch.zeros(3, 8, dtype=F64)).c_star, sol.c_flat)


def test_vector_rule_is_the_per_entry_fisher_mean_with_the_plain_mean_where_no_task_cares():
    taus = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 7.0]], dtype=F64)
    f = torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]], dtype=F64)
    torch.testing.assert_close(vector_rule(taus, f), torch.tensor([2.5, 4.0, 6.0], dtype=F64))
    torch.testing.assert_close(vector_rule(taus), taus.mean(0))


def test_vectors_and_embeddings_get_alpha_T_times_the_fisher_mean_through_merge():
    tvs = make_set(seed=8)
    fishers = fishers_for(tvs, seed=9)
    inputs = StatsInputs(tvs, fishers=fishers)
    out = merge(inputs, "epimer", metric="fisher", alpha=0.4)
    for name in ("blocks.0.attn.bias", "norm.weight", "embed.weight"):
        taus = tvs.deltas(name).double().reshape(3, -1)
        f = torch.stack([fishers[t][name].double().reshape(-1) for t in tvs.tasks])
        expected = 0.4 * 3 * (f * taus).sum(0) / f.sum(0)
        torch.testing.assert_close(out[name].double().reshape(-1), expected, rtol=1e-5, atol=1e-7)
    # the linear weight: the pure solve, scaled by α·T
    name = "blocks.0.attn.weight"
    taus = tvs.deltas(name).double().reshape(3, -1)
    f = torch.stack([fishers[t][name].double().reshape(-1) for t in tvs.tasks])
    torch.testing.assert_close(out[name].double().reshape(-1), 0.4 * 3 * epimer_point(taus, subspace_basis(taus), f),
                               rtol=1e-5, atol=1e-7)


def test_kfac_input_uses_mean_grams_on_linear_weights_and_identity_elsewhere():
    tvs = make_set(seed=10)
    grams = grams_for(tvs, seed=11)
    inputs = StatsInputs(tvs, grams=grams)
    out = merge(inputs, "epimer", metric="kfac_input", alpha=1.0)
    ta = merge(inputs, "task_arithmetic", alpha=1.0)
    for name in tvs.param_names:
        if name in LINEAR:
            taus = tvs.deltas(name).double().reshape(3, -1)
            g = torch.stack([grams[t][name] / grams[t][f"rows::{name}"] for t in tvs.tasks])
            expected = 3 * epimer_point(taus, subspace_basis(taus), kfac_input_metric(g, tvs.shape(name)))
            torch.testing.assert_close(out[name].double().reshape(-1), expected, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(out[name], ta[name], atol=1e-4)
        else:
            torch.testing.assert_close(out[name], ta[name], rtol=1e-5, atol=1e-7)
    table = epimer_diagnostics(inputs, metric="kfac_input")
    used = table.drop_duplicates("param").set_index("param")["curvature"]
    assert used["blocks.0.attn.weight"] == "kfac_input" and used["blocks.1.conv.weight"].startswith("identity")


def test_alpha_change_is_a_multiply_of_the_memoised_merge():
    tvs = make_set(seed=12)
    inputs = StatsInputs(tvs, fishers=fishers_for(tvs, seed=13))
    one = merge(inputs, "epimer", alpha=0.3)
    two = merge(inputs, "epimer", alpha=0.6)
    for name in tvs.param_names:
        torch.testing.assert_close(two[name], 2 * one[name])


# ---------------------------------------------------------------- (4) diagnostics
def _diag(taus, basis, metric):
    return layer_diagnostics(taus, basis, metric)


def test_frechet_variance_vanishes_when_all_task_vectors_are_equal():
    g = gen(14)
    tau = torch.randn(16, generator=g, dtype=F64)
    taus = tau.expand(3, 16).clone()
    diag = torch.exp(torch.randn(3, 16, generator=g, dtype=F64))
    assert _diag(taus, subspace_basis(taus), diag)["frechet_variance"] == pytest.approx(0.0, abs=1e-20)
    # a subspace that does not contain τ: c* also answers the out-of-subspace part through H's coupling
    # (BᵀH_t r_t ≠ 0), so V vanishes there only for the identity metric
    other = orthonormal_basis(torch.randn(16, 4, generator=g, dtype=F64))
    assert _diag(taus, other, None)["frechet_variance"] == pytest.approx(0.0, abs=1e-20)
    different = torch.randn(3, 16, generator=g, dtype=F64)
    assert _diag(different, subspace_basis(different), diag)["frechet_variance"] > 1e-3


def test_residual_vanishes_when_the_subspace_contains_every_task_vector():
    g = gen(15)
    taus = torch.randn(3, 16, generator=g, dtype=F64)
    diag = torch.exp(torch.randn(3, 16, generator=g, dtype=F64))
    d = _diag(taus, subspace_basis(taus), diag)
    assert d["residual_energy"] == pytest.approx(0.0, abs=1e-20)
    low = _diag(taus, subspace_basis(taus, rank=1, shape=(4, 4)), diag)
    assert low["residual_energy"] > 1e-3
    # the error bound: L(Bc*) ≤ V + R
    for dd in (d, low):
        assert dd["quadratic_loss"] <= dd["frechet_variance"] + dd["residual_energy"] + 1e-12


def test_heterogeneity_vanishes_for_proportional_metrics_and_not_otherwise():
    g = gen(16)
    taus = torch.randn(3, 16, generator=g, dtype=F64)
    basis = subspace_basis(taus)
    h = torch.exp(torch.randn(16, generator=g, dtype=F64))
    proportional = torch.stack([0.5 * h, 2.0 * h, 7.0 * h])
    d = _diag(taus, basis, proportional)
    assert d["heterogeneity"] == pytest.approx(0.0, abs=1e-12)
    assert d["flat_departure"] > 1e-3                 # unequal scales still reweight the tasks
    equal = _diag(taus, basis, h.expand(3, 16))
    assert equal["heterogeneity"] == pytest.approx(0.0, abs=1e-12)
    assert equal["flat_departure"] == pytest.approx(0.0, abs=1e-10)
    assert equal["predicted_gain"] == pytest.approx(0.0, abs=1e-10)
    hetero = _diag(taus, basis, torch.exp(2 * torch.randn(3, 16, generator=g, dtype=F64)))
    assert hetero["heterogeneity"] > 0.05 and hetero["flat_departure"] > 1e-3 and hetero["predicted_gain"] > 0


def test_identity_diagnostics_are_flat():
    g = gen(17)
    taus = torch.randn(4, 20, generator=g, dtype=F64)
    d = _diag(taus, subspace_basis(taus), None)
    assert d["heterogeneity"] == pytest.approx(0.0, abs=1e-12)
    assert d["flat_departure"] == pytest.approx(0.0, abs=1e-12)
    assert d["ta_departure"] == pytest.approx(0.0, abs=1e-12)
    assert d["frechet_variance"] == pytest.approx(float(((taus - taus.mean(0)) ** 2).sum()), rel=1e-10)


def test_ta_departure_is_the_relative_distance_to_task_arithmetic():
    g = gen(18)
    taus = torch.randn(3, 12, generator=g, dtype=F64)
    diag = torch.exp(torch.randn(3, 12, generator=g, dtype=F64))
    basis = subspace_basis(taus)
    d = _diag(taus, basis, diag)
    merged = 3 * epimer_point(taus, basis, diag)
    expected = float(torch.linalg.vector_norm(merged - taus.sum(0)) / torch.linalg.vector_norm(taus.sum(0)))
    assert d["ta_departure"] == pytest.approx(expected, rel=1e-10)


def test_diagnostics_table_through_the_inputs():
    tvs = make_set(seed=19)
    inputs = StatsInputs(tvs, fishers=fishers_for(tvs, seed=20))
    table = epimer_diagnostics(inputs, metric="fisher")
    layers = tvs.names_of_kind("matrix", "conv")
    assert list(table.columns) == DIAGNOSTIC_COLUMNS
    assert len(table) == len(layers) * len(DIAGNOSTICS)
    assert set(table["param"]) == set(layers) and set(table["curvature"]) == {"fisher"}
    wide = diagnostics_wide(table)
    assert list(wide["param"]) == layers and set(DIAGNOSTICS) <= set(wide.columns)
    assert (wide["k"] == 3).all() and (wide["residual_energy"].abs() < 1e-12).all()
    # no data at all: the identity diagnostics still run
    plain = epimer_diagnostics(MergeInputs(tvs, device="cpu", persist=False), metric="identity")
    assert (plain[plain["metric"] == "ta_departure"]["value"].abs() < 1e-6).all()


def test_fisher_mass_shares_sum_to_one_per_task():
    tvs = make_set(seed=21)
    fishers = fishers_for(tvs, seed=22, scale=[1.0, 10.0, 1e-3])
    table = fisher_mass_table(tvs, fishers)
    assert len(table) == len(tvs.tasks) * len(tvs.param_names)
    for _, part in table.groupby("task"):
        assert part["share"].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- declaration and errors
def test_declaration_needs_and_knobs():
    spec = METHODS["epimer"]
    assert spec.unavailable(3, has_data=False) is not None and spec.unavailable(3, has_data=True) is None
    assert spec.defaults(3) == {"alpha": 0.3, "metric": "fisher", "rank": 0, "n_examples": 256}
    assert "Geometry Perspective" in spec.reference and spec.peak_memory


def test_an_evaluator_without_the_data_api_is_a_clear_error():
    class NoApi:
        tasks = ["t0", "t1", "t2"]
    tvs = make_set(seed=23)
    inputs = MergeInputs(tvs, NoApi(), device="cpu", persist=False)
    with pytest.raises(ValidationError, match="metric='fisher'"):
        merge(inputs, "epimer")
    with pytest.raises(ValidationError, match="needs labelled data"):
        merge(MergeInputs(tvs, device="cpu", persist=False), "epimer", metric="identity")
