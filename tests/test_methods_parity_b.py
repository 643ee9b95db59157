"""CART, WUDI, AdaMerging, EMR and KnOTS against answers known by construction
or worked by hand (issue 16, method parity with FusionBench and mergekit)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from analysis.evaluation import Evaluator, FeatureSplit, Head
from analysis.merging import MergeInputs, merge
from analysis.merging.adamerging import fit_coefficients
from analysis.merging.knots import shared_basis
from analysis.merging.regmean import regmean_solve
from analysis.merging.ties import disjoint_merge, topk_thresholds
from analysis.merging.wudi import normal_equations, wudi_adam, wudi_closed_form, wudi_loss
from analysis.taskvectors import TaskVectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny tensors: one thread is faster on a busy CPU


def exact_set(deltas):
    """Base of zeros: fine-tuned minus base is the delta bit for bit."""
    first = next(iter(deltas.values()))
    base = {k: torch.zeros(v.shape) for k, v in first.items()}
    return TaskVectorSet.from_state_dicts(base, {t: {k: v.clone() for k, v in d.items()} for t, d in deltas.items()})


def random_set(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.weight": (12, 20), "blocks.0.attn.bias": (12,), "blocks.1.mlp.weight": (30, 10),
              "blocks.1.conv.weight": (6, 4, 3, 3), "embed.weight": (15, 6), "norm.weight": (10,)}
    return exact_set({f"t{i}": {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
                      for i in range(n_tasks)})


def orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ================================================================ CART
def test_cart_keeps_the_top_direction_of_each_centred_vector():
    """τ_t = M + c_t with Σ c_t = 0 and each c_t of rank 2 with distinct singular values:
    at rank 1 the kept parts are 3e1f1ᵀ, −3e1f1ᵀ and −2e3f3ᵀ, so δ = M + λ(−2 e3 f3ᵀ)."""
    e, f = orthonormal(4, 0), orthonormal(5, 1)
    outer = lambda i: torch.outer(e[:, i], f[:, i])   # noqa: E731
    m = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    c = [3 * outer(0) + 1 * outer(1), -3 * outer(0) + 2 * outer(2), -1 * outer(1) - 2 * outer(2)]
    bias = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([-1.0, 6.0])]
    tvs = exact_set({f"t{i}": {"w": m + c[i], "b": bias[i]} for i in range(3)})
    for lam in (2.0, 0.5):
        out = merge(tvs, "cart", rank_fraction=0.25, lam=lam, device="cpu")    # ⌊0.25·4⌋ = 1
        close(out["w"], m - 2 * lam * outer(2))
        close(out["b"], torch.tensor([1.0, 2.0]))                             # vectors: the mean


def test_cart_at_full_rank_is_weight_averaging():
    tvs = random_set()
    cart = merge(tvs, "cart", rank_fraction=1.0, lam=2.0, device="cpu")
    avg = merge(tvs, "weight_averaging", device="cpu")
    for name in tvs.param_names:
        close(cart[name], avg[name])


def test_cart_of_two_tasks_is_the_average_at_any_rank():
    """T = 2: the centred vectors are ±(τ_1 − τ_2)/2 and their low-rank parts cancel."""
    tvs = random_set(n_tasks=2)
    cart = merge(tvs, "cart", rank_fraction=0.1, lam=3.0, device="cpu")
    avg = merge(tvs, "weight_averaging", device="cpu")
    for name in tvs.param_names:
        close(cart[name], avg[name])


def test_cart_of_equal_task_vectors_is_that_vector():
    one = torch.randn(7, 9, generator=torch.Generator().manual_seed(3))
    tvs = exact_set({t: {"w": one} for t in "abc"})
    close(merge(tvs, "cart", device="cpu")["w"], one)


def test_cart_lambda_change_reuses_the_svds(monkeypatch):
    import analysis.merging.cart as cart
    calls = []
    real = cart.thin_svd
    monkeypatch.setattr(cart, "thin_svd", lambda a: calls.append(a.shape) or real(a))
    tvs = random_set()
    a = merge(tvs, "cart", lam=1.0, device="cpu")
    n = len(calls)
    b = merge(tvs, "cart", lam=3.0, device="cpu")
    assert n > 0 and len(calls) == n
    for name in tvs.names_of_kind("matrix", "conv"):
        mean = tvs.deltas(name).mean(0)
        close(b[name] - mean, 3.0 * (a[name] - mean))


# ================================================================ WUDI
def wudi_grams(taus: torch.Tensor) -> torch.Tensor:
    """The paper's proxy Grams, written out: G_t = τ_tᵀτ_t / ‖τ_t‖²_F, (T, in, in) float64."""
    t = taus.double()
    return (t.mT @ t) / t.pow(2).sum((1, 2))[:, None, None]


def test_wudi_normal_equations_accumulate_the_papers_grams():
    for shape in ((3, 6, 5), (3, 5, 6)):        # both orders of the τ_t G_t product
        taus = torch.randn(*shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        gram, rhs = normal_equations(taus)
        close(gram, wudi_grams(taus).sum(0), tol=1e-12)
        close(rhs, (taus @ wudi_grams(taus)).sum(0), tol=1e-12)


def test_wudi_on_disjoint_input_columns_is_the_sum():
    g = torch.Generator().manual_seed(4)
    taus = torch.zeros(3, 5, 8)
    for t, cols in enumerate((slice(0, 3), slice(3, 6), slice(6, 8))):
        taus[t][:, cols] = torch.randn(5, cols.stop - cols.start, generator=g)
    tvs = exact_set({f"t{t}": {"w": taus[t], "b": taus[t, :, 0]} for t in range(3)})
    out = merge(tvs, "wudi", device="cpu")
    close(out["w"], taus.sum(0))
    close(out["b"], taus[:, :, 0].mean(0))                                     # vectors: the mean
    close(merge(tvs, "wudi", alpha=0.5, device="cpu")["w"], 0.5 * taus.sum(0))


def test_wudi_of_equal_task_vectors_is_that_vector():
    one = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    tvs = exact_set({t: {"w": one} for t in "ab"})
    close(merge(tvs, "wudi", device="cpu")["w"], one)


def test_wudi_closed_form_is_regmean_with_task_vector_grams_and_minimises_the_loss():
    taus = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sol = wudi_closed_form(taus)
    close(sol, regmean_solve(taus, wudi_grams(taus), 1.0), tol=1e-10)
    grad = ((sol[None] - taus) @ taus.mT @ taus / taus.pow(2).sum((1, 2))[:, None, None]).sum(0)
    assert float(grad.abs().max()) < 1e-10
    best = float(wudi_loss(sol, taus))
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        assert float(wudi_loss(sol + 1e-3 * torch.randn(sol.shape, generator=g, dtype=sol.dtype), taus)) > best


def test_wudi_closed_form_is_the_gradient_descent_limit_from_the_sum_when_grams_are_singular():
    """Rank-1 task vectors (a LoRA-like set): G = Σ G_t has rank 2 of 7; gradient descent
    from the paper's start Σ τ_t converges to the closed form (it never leaves the span)."""
    g = torch.Generator().manual_seed(8)
    taus = torch.stack([torch.outer(torch.randn(4, generator=g, dtype=torch.float64),
                                    torch.randn(7, generator=g, dtype=torch.float64)) for _ in range(2)])
    grams = wudi_grams(taus)
    gram, rhs = grams.sum(0), (taus @ grams).sum(0)
    assert int(torch.linalg.matrix_rank(gram)) == 2
    x, step = taus.sum(0), 1.0 / (2 * float(torch.linalg.eigvalsh(gram).max()))
    for _ in range(20000):
        x = x - step * 2 * (x @ gram - rhs)
    close(wudi_closed_form(taus), x, tol=1e-8)


def test_wudi_adam_is_the_papers_procedure_started_at_the_sum():
    g = torch.Generator().manual_seed(9)
    taus = torch.randn(3, 5, 4, generator=g)
    tvs = exact_set({f"t{t}": {"w": taus[t]} for t in range(3)})
    few = merge(tvs, "wudi", solver="adam", steps=1, lr=1e-5, device="cpu")["w"]
    assert float((few - taus.sum(0)).abs().max()) <= 1e-5 * 1.01      # one Adam step moves an entry by ≤ lr
    # the closed-form gradient it uses is the loss's autograd gradient
    point = (taus.sum(0) + 0.1).requires_grad_(True)
    wudi_loss(point, taus).backward()
    grams = wudi_grams(taus)
    close(2 * (point.detach().double() @ grams.sum(0) - (taus.double() @ grams).sum(0)).float(), point.grad, tol=1e-4)
    # run long enough, it reaches the exact minimiser
    close(wudi_adam(taus, steps=1000, lr=2e-2), wudi_closed_form(taus), tol=1e-4)


def test_wudi_leaves_conv_and_embeddings_to_the_average_unless_asked():
    tvs = random_set()
    out = merge(tvs, "wudi", alpha=2.0, device="cpu")
    for name in ("blocks.1.conv.weight", "embed.weight", "norm.weight"):
        close(out[name], 2.0 * tvs.deltas(name).mean(0))
    inc = merge(tvs, "wudi", include_embeddings=True, device="cpu")
    close(inc["embed.weight"], wudi_closed_form(tvs.deltas("embed.weight")))


# ================================================================ EMR
def emr_example():
    """Three tasks, a 3-entry tensor `a` (worked in the docstring of each test) and a 1-entry `b`."""
    a = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, 2.0])]
    b = [torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([1.0])]
    return exact_set({f"t{i}": {"a": a[i], "b": b[i]} for i in range(3)})


def test_emr_by_hand():
    """a: sum [2, −2, 4] → signs [+, −, +]; τ_uni = [2, −2, 3]; masks t0 [1,1,1], t1 [1,0,0], t2 [0,1,1].
    b: sum −1 → τ_uni = −3, only t1 agrees.
    λ = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over both tensors: t0 (6+1)/(7+0) = 1, t1 (4+3)/(2+3) = 1.4, t2 (4+1)/(5+0) = 1."""
    result = merge(emr_example(), "emr", device="cpu")
    assert result.per_task and len(result.models()) == 3
    close(result.for_task("t0")["a"], torch.tensor([2.0, -2.0, 3.0]))
    close(result.for_task("t0")["b"], torch.tensor([0.0]))
    close(result.for_task("t1")["a"], 1.4 * torch.tensor([2.0, 0.0, 0.0]))
    close(result.for_task("t1")["b"], 1.4 * torch.tensor([-3.0]))
    close(result.for_task("t2")["a"], torch.tensor([0.0, -2.0, 3.0]))


def test_emr_official_rescaler_sums_per_tensor_means():
    """λ_t = Σ_p mean|τ_t,p| / Σ_p mean|M ⊙ τ_uni|_p: t0 (2 + 1)/(7/3) = 9/7,
    t1 (4/3 + 3)/(2/3 + 3) = 13/11, t2 (4/3 + 1)/(5/3) = 7/5."""
    result = merge(emr_example(), "emr", rescaler="tensor_means", device="cpu")
    close(result.for_task("t0")["a"], 9 / 7 * torch.tensor([2.0, -2.0, 3.0]))
    close(result.for_task("t1")["b"], 13 / 11 * torch.tensor([-3.0]))
    close(result.for_task("t2")["a"], 7 / 5 * torch.tensor([0.0, -2.0, 3.0]))


def test_emr_of_one_task_is_that_task_vector():
    tvs = random_set().subset(["t1"])
    result = merge(tvs, "emr", device="cpu")
    for name in tvs.param_names:
        assert torch.equal(result.for_task("t1")[name], tvs.deltas(name)[0])


def test_emr_entries_whose_sum_is_zero_are_elected_for_no_task():
    tvs = exact_set({"a": {"w": torch.tensor([1.0, 2.0])}, "b": {"w": torch.tensor([-1.0, 1.0])}})
    result = merge(tvs, "emr", device="cpu")
    assert float(result.for_task("a")["w"][0]) == 0.0 and float(result.for_task("b")["w"][0]) == 0.0


# ================================================================ KnOTS
@pytest.mark.parametrize("include_embeddings", [False, True])
def test_knots_with_a_linear_inner_method_is_that_method(include_embeddings):
    tvs = random_set()
    for inner, plain, a in (("task_arithmetic", "task_arithmetic", 0.3), ("weight_averaging", "weight_averaging", 1.0)):
        knots = merge(tvs, "knots", inner=inner, alpha=a, include_embeddings=include_embeddings, device="cpu")
        ref = merge(tvs, plain, device="cpu", **({"alpha": a} if plain == "task_arithmetic" else {}))
        for name in tvs.param_names:
            close(knots[name], ref[name])


def test_knots_of_one_task_is_the_task_vector():
    tvs = random_set().subset(["t2"])
    for inner in ("task_arithmetic", "ties"):
        out = merge(tvs, "knots", inner=inner, alpha=1.0, density=1.0, device="cpu")
        for name in tvs.param_names:
            close(out[name], tvs.deltas(name)[0])


def test_knots_basis_of_low_rank_updates_has_their_joint_rank():
    """Three rank-2 updates (LoRA B·A) of a 10 × 12 layer: r = 6, U orthonormal, UUᵀτ_t = τ_t."""
    g = torch.Generator().manual_seed(10)
    taus = torch.stack([torch.randn(10, 2, generator=g) @ torch.randn(2, 12, generator=g) for _ in range(3)])
    u = shared_basis(taus)
    assert u.shape == (10, 6)
    close(u.mT @ u, torch.eye(6))
    close(u @ (u.mT @ taus), taus)


def test_knots_ties_is_ties_on_the_singular_value_scaled_v_blocks():
    """The official construction: [τ_1 … τ_T] = U Σ [V_1ᵀ … V_Tᵀ] (torch.linalg.svd), TIES on
    Σ V_tᵀ per tensor, then U ·; sign flips of singular pairs leave the result unchanged."""
    g = torch.Generator().manual_seed(11)
    taus = torch.randn(3, 8, 5, generator=g)
    tvs = exact_set({f"t{t}": {"w": taus[t]} for t in range(3)})
    out = merge(tvs, "knots", inner="ties", scope="parameter", density=0.3, alpha=1.0, device="cpu")
    u, s, vh = torch.linalg.svd(torch.cat(list(taus.double()), dim=1), full_matrices=False)
    coords = torch.stack((s[:, None] * vh).split(5, dim=1))               # (T, r, in)
    thr = topk_thresholds(coords.reshape(3, -1).abs(), 0.3)
    close(out["w"], (u @ disjoint_merge(coords, thr)).float(), tol=1e-4)
    ties = merge(tvs, "ties", scope="parameter", density=0.3, device="cpu")
    assert not torch.allclose(out["w"], ties["w"], atol=1e-3)              # the alignment changes the merge


def test_knots_dare_ties_without_drops_is_knots_ties():
    tvs = random_set()
    a = merge(tvs, "knots", inner="ties", device="cpu")
    b = merge(tvs, "knots", inner="dare_ties", drop_rate=0.0, device="cpu")
    for name in tvs.param_names:
        close(a[name], b[name])
    c = merge(tvs, "knots", inner="dare_ties", drop_rate=0.5, device="cpu")
    assert not torch.allclose(c["blocks.0.attn.weight"], a["blocks.0.attn.weight"])


# ================================================================ AdaMerging
class SineFeatures(nn.Module):
    """Features [sin(a·x), sin(b·x)] of a scalar input: with a base of zeros and task vectors
    τ_a = π, τ_b = 1.25π, a head scoring ±(f_1 + f_2) is most confident (lowest entropy) at
    sin(λ_a π) = sin(λ_b 1.25π) = 1, i.e. λ_a = 0.5, λ_b = 0.4."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.a.weight), nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return torch.cat([torch.sin(self.a(x)), torch.sin(self.b(x))], dim=1)


@pytest.fixture
def sine_inputs(tmp_path):
    backbone = SineFeatures()
    base = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    ones = FeatureSplit(torch.ones(8, 1), torch.zeros(8, dtype=torch.long))
    ev = Evaluator(backbone, {"t": {"test": ones, "validation": ones}},
                   {"t": Head(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.zeros(2))}, device="cpu")
    tvs = TaskVectorSet.from_state_dicts(base, {"t": {"a.weight": torch.tensor([[math.pi]]),
                                                      "b.weight": torch.tensor([[1.25 * math.pi]])}})
    return MergeInputs(tvs, ev, device="cpu", cache_dir=tmp_path)


def test_adamerging_layer_wise_finds_the_known_entropy_minimum(sine_inputs):
    fit = fit_coefficients(sine_inputs, mode="layer_wise", steps=400, lr=0.01, batch_size=8)
    assert fit.for_param("a.weight")[0] == pytest.approx(0.5, abs=0.02)
    assert fit.for_param("b.weight")[0] == pytest.approx(0.4, abs=0.02)
    assert fit.entropy[-1] < fit.entropy[0]


def test_adamerging_task_wise_finds_the_known_entropy_minimum(sine_inputs):
    """One λ for both tensors: the maximiser of sin(πλ) + sin(1.25πλ) on [0, 1] (found by bisection)."""
    lo, hi = 0.3, 0.6
    deriv = lambda lam: math.cos(math.pi * lam) + 1.25 * math.cos(1.25 * math.pi * lam)   # noqa: E731
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if deriv(mid) > 0 else (lo, mid)
    fit = fit_coefficients(sine_inputs, mode="task_wise", steps=400, lr=0.01, batch_size=8)
    assert float(fit.coefficients[0]) == pytest.approx(lo, abs=0.02)


def test_adamerging_entropy_decreases_step_by_step_on_full_batches(sine_inputs):
    fit = fit_coefficients(sine_inputs, mode="task_wise", steps=10, lr=0.01, batch_size=8)
    assert len(fit.entropy) == 11
    assert all(b < a for a, b in zip(fit.entropy, fit.entropy[1:]))


def test_adamerging_clamps_lambda_to_the_unit_interval(sine_inputs):
    """From λ = 1 the entropy pulls λ down towards 0.4–0.5; from 0 it pulls up: clamped values stay in [0, 1]."""
    fit = fit_coefficients(sine_inputs, mode="layer_wise", steps=5, lr=0.1, init=1.0, batch_size=8)
    assert bool(((fit.coefficients >= 0) & (fit.coefficients <= 1)).all())


def test_adamerging_with_no_steps_is_task_arithmetic_at_its_init(tiny_workspace, tmp_path):
    inputs = MergeInputs(tiny_workspace.tvs, tiny_workspace.evaluator, device="cpu", cache_dir=tmp_path)
    ada = merge(inputs, "adamerging", steps=0)
    ta = merge(inputs, "task_arithmetic", alpha=0.3)
    for name in inputs.tvs.param_names:
        close(ada[name], ta[name])


def test_adamerging_merge_is_the_sum_weighted_by_the_returned_coefficients(tiny_workspace, tmp_path):
    inputs = MergeInputs(tiny_workspace.tvs, tiny_workspace.evaluator, device="cpu", cache_dir=tmp_path)
    knobs = dict(mode="layer_wise", steps=3, lr=0.05, split="validation")
    result = merge(inputs, "adamerging", **knobs)
    fit = fit_coefficients(inputs, **knobs)
    assert fit is fit_coefficients(inputs, **knobs)                    # memoised: one fit per configuration
    assert fit.coefficients.shape == (len(inputs.tvs.param_names), 3)
    assert not torch.allclose(fit.coefficients, torch.full_like(fit.coefficients, 0.3))
    for name in inputs.tvs.param_names:
        close(result[name], torch.tensordot(fit.for_param(name), inputs.tvs.deltas(name), dims=1))
