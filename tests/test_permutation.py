"""Known-answer tests of permutation alignment on tiny models (digits MLPs
trained in the test, random CNN / residual nets)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from analysis.errors import HyperparameterError, ValidationError
from analysis.permutation import (PermutationSpec, apply_permutation, barriers, c2m3, conv_bn_chain_spec,
                                  cycle_error, interpolation_curve, invert, loss_plane, matching_objective,
                                  merge_in_universe, mlp_spec_from_state_dict, plane_basis, random_perms, repair,
                                  residual_mlp_spec, unit_statistics, weight_matching)
from analysis.permutation.mlp import (evaluate_mlp, mlp_forward, mlp_preactivations, mlp_repair_layers,
                                      train_small_mlp)
from analysis.permutation.pipeline import align_to_first, merge_models

WIDTHS = (64, 32, 32, 10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(digits_xy):
    x, y = digits_xy
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def models(digits):
    (x, y), _ = digits
    return [train_small_mlp(x, y, WIDTHS, seed=s, epochs=20, batch_size=128) for s in range(3)]


def same(a, b, atol=0.0):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


# ---- specs: permuting never changes the function -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_an_mlp_preserves_outputs(models, digits, seed):
    sd = models[0]
    spec = mlp_spec_from_state_dict(sd)
    perms = random_perms(spec.sizes(sd), seed)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = apply_permutation(sd, spec, perms)
    x = digits[1][0]
    assert not same(sd, permuted)
    torch.testing.assert_close(mlp_forward(permuted, x), mlp_forward(sd, x), atol=1e-5, rtol=1e-5)


def test_permuting_a_residual_net_preserves_outputs():
    torch.manual_seed(0)
    sd = {"stem.weight": torch.randn(8, 5), "stem.bias": torch.randn(8), "head.weight": torch.randn(3, 8),
          "head.bias": torch.randn(3)}
    for i in range(2):
        sd |= {f"b{i}.fc1.weight": torch.randn(6, 8), f"b{i}.fc1.bias": torch.randn(6),
               f"b{i}.fc2.weight": torch.randn(8, 6), f"b{i}.fc2.bias": torch.randn(8)}
    spec = residual_mlp_spec("stem", [("b0.fc1", "b0.fc2"), ("b1.fc1", "b1.fc2")], "head")

    def forward(p, x):
        h = F.linear(x, p["stem.weight"], p["stem.bias"])
        for i in range(2):
            h = h + F.linear(torch.relu(F.linear(h, p[f"b{i}.fc1.weight"], p[f"b{i}.fc1.bias"])),
                             p[f"b{i}.fc2.weight"], p[f"b{i}.fc2.bias"])
        return F.linear(torch.relu(h), p["head.weight"], p["head.bias"])

    assert set(spec.groups) == {"res", "b0", "b1"}
    perms = random_perms(spec.sizes(sd), 1)
    x = torch.randn(7, 5)
    torch.testing.assert_close(forward(apply_permutation(sd, spec, perms), x), forward(sd, x))
    # a wrong spec (residual stream permuted in one block only) breaks the function: the test can fail
    broken = PermutationSpec({**spec.axes, "b1.fc2.weight": ("res_other", "b1"), "b1.fc2.bias": ("res_other",)})
    bad = apply_permutation(sd, broken, {**perms, "res_other": torch.roll(perms["res"], 1)})
    assert not torch.allclose(forward(bad, x), forward(sd, x))


def test_permuting_a_cnn_with_batchnorm_preserves_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 4))
    for m in net:
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    net.eval()
    spec = conv_bn_chain_spec([("0", "1"), ("3", "4")], head="8")
    sd = net.state_dict()
    spec.validate(sd)
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    net.load_state_dict(apply_permutation(sd, spec, random_perms(spec.sizes(sd), 5)))
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


def test_spec_errors_name_the_parameter(models):
    sd = dict(models[0])
    spec = mlp_spec_from_state_dict(sd)
    sd["layers.1.weight"] = torch.zeros(32, 31)
    with pytest.raises(ValidationError, match=r"h0.*layers.1.weight"):
        spec.validate(sd)
    with pytest.raises(ValidationError, match="layers.9.weight"):
        PermutationSpec({"layers.9.weight": ("h0", None)}).validate(models[0])


# ---- weight matching and C2M3 on a model and its permuted copies ---------------------------------

def _loss_fn(digits):
    (x, y), _ = digits
    return lambda sd: {"loss": evaluate_mlp(sd, x, y)["loss"]}


def test_weight_matching_recovers_a_random_permutation(models, digits):
    a = models[0]
    spec = mlp_spec_from_state_dict(a)
    perms = random_perms(spec.sizes(a), 7)
    b = apply_permutation(a, spec, perms)
    found = weight_matching(a, b, spec, seed=3)
    # unit i of aligned B is unit found[i] of B, which is unit perms[found[i]] of A: must be i
    for g in perms:
        assert torch.equal(perms[g][found[g]], torch.arange(len(found[g])))
    aligned = apply_permutation(b, spec, found)
    assert same(aligned, a)
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    aligned_b = barriers(interpolation_curve(_loss_fn(digits), a, aligned, lams))
    naive_b = barriers(interpolation_curve(_loss_fn(digits), a, b, lams))
    assert abs(aligned_b["midpoint"]) < 1e-5 and abs(aligned_b["path"]) < 1e-5
    assert naive_b["path"] > 0.1  # the naive path really has a barrier


def test_weight_matching_is_seedable_and_improves_the_objective(models):
    a, b = models[0], models[1]
    spec = mlp_spec_from_state_dict(a)
    p1, p2 = weight_matching(a, b, spec, seed=4), weight_matching(a, b, spec, seed=4)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)
    ident = {g: torch.arange(n) for g, n in spec.sizes(a).items()}
    assert matching_objective(a, b, spec, p1) > matching_objective(a, b, spec, ident)


def test_c2m3_recovers_permutations_of_three_copies(models, digits):
    a = models[0]
    spec = mlp_spec_from_state_dict(a)
    copies = [a] + [apply_permutation(a, spec, random_perms(spec.sizes(a), s)) for s in (11, 12)]
    res = c2m3(copies, spec)
    for j in (1, 2):
        assert same(apply_permutation(copies[j], spec, res.pairwise(0, j)), a)
        assert same(apply_permutation(copies[0], spec, res.pairwise(j, 0)), copies[j])
    # everything maps onto one universe: the merge is the model itself
    merged = merge_in_universe(copies, spec, res.perms, basis=0)
    assert same(merged, a, atol=1e-6)
    aligned = apply_permutation(copies[1], spec, res.pairwise(0, 1))
    b = barriers(interpolation_curve(_loss_fn(digits), a, aligned, [0.0, 0.5, 1.0]))
    assert abs(b["path"]) < 1e-5


def test_c2m3_is_cycle_consistent_and_pairwise_matching_is_not(models, capsys):
    spec = mlp_spec_from_state_dict(models[0])
    res = c2m3(models, spec)
    c2 = cycle_error([res.pairwise(0, 1), res.pairwise(1, 2), res.pairwise(2, 0)])
    assert all(v == 0.0 for v in c2.values())
    wm = [weight_matching(models[i], models[j], spec, seed=0) for i, j in ((0, 1), (1, 2), (2, 0))]
    pw = cycle_error(wm)
    with capsys.disabled():
        print(f"\ncycle error on 3 digits MLPs {WIDTHS}: pairwise WM {pw}, C2M3 {c2}")
    assert max(pw.values()) > 0.0  # measured on these seeds: see the printed value
    # Frank-Wolfe with exact line search never decreases the relaxed objective
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(res.objective, res.objective[1:]))


def test_c2m3_merge_beats_naive_averaging(models, digits):
    spec = mlp_spec_from_state_dict(models[0])
    (_, _), (xt, yt) = digits
    naive = evaluate_mlp(merge_models(models, spec, "none"), xt, yt)["accuracy"]
    aligned = evaluate_mlp(merge_models(models, spec, "c2m3"), xt, yt)["accuracy"]
    assert aligned > naive + 0.2


def test_c2m3_rejects_bad_arguments(models):
    spec = mlp_spec_from_state_dict(models[0])
    with pytest.raises(ValidationError, match="at least 2"):
        c2m3(models[:1], spec)
    with pytest.raises(HyperparameterError, match="init"):
        c2m3(models, spec, init="random")
    with pytest.raises(HyperparameterError, match="alignment method"):
        align_to_first(models, spec, "git_rebasin")


# ---- REPAIR ---------------------------------------------------------------------------------------

def test_repair_sets_the_interpolated_statistics(models, digits):
    (x, _), _ = digits
    spec = mlp_spec_from_state_dict(models[0])
    aligned = align_to_first(models[:2], spec, "weight_matching")
    w = [0.3, 0.7]
    merged = {k: w[0] * aligned[0][k] + w[1] * aligned[1][k] for k in aligned[0]}
    fixed = repair(merged, aligned, mlp_repair_layers(merged), mlp_preactivations, x, weights=w)
    ends = [unit_statistics(sd, mlp_preactivations, x) for sd in aligned]
    got = unit_statistics(fixed, mlp_preactivations, x)
    before = unit_statistics(merged, mlp_preactivations, x)
    for l, (mu, sd) in enumerate(got):
        mu_t = w[0] * ends[0][l][0] + w[1] * ends[1][l][0]
        sd_t = w[0] * ends[0][l][1] + w[1] * ends[1][l][1]
        live = sd_t > 1e-3  # dead units (std 0) are left at their mean
        torch.testing.assert_close(mu, mu_t, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(sd[live], sd_t[live], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(before[-1][1], got[-1][1], atol=1e-3)  # it did change something


def test_repair_of_a_model_against_itself_changes_nothing(models, digits):
    (x, _), _ = digits
    sd = models[0]
    fixed = repair(sd, [sd], mlp_repair_layers(sd), mlp_preactivations, x, eps=0.0)
    live = unit_statistics(sd, mlp_preactivations, x)
    for (wn, bn), (_, s) in zip(mlp_repair_layers(sd), live):
        keep = s > 0
        torch.testing.assert_close(fixed[wn][keep], sd[wn][keep], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fixed[bn][keep], sd[bn][keep], atol=1e-4, rtol=1e-4)
    with pytest.raises(HyperparameterError, match="weights"):
        repair(sd, [sd, sd], mlp_repair_layers(sd), mlp_preactivations, x, weights=[0.5, 0.6])


# ---- barriers and the plane -----------------------------------------------------------------------

def test_barrier_definitions_on_a_hand_made_curve():
    curve = pd.DataFrame({"lam": [0.0, 0.5, 1.0], "metric": "loss", "value": [1.0, 2.5, 3.0]})
    b = barriers(curve)
    assert b["path"] == pytest.approx(0.5)       # at lam = 0.5: 2.5 - 2.0 (the ends are never a barrier)
    assert b["midpoint"] == pytest.approx(0.5)   # L(1/2) - (1 + 3) / 2
    curve["value"] = [1.0, 2.0, 3.0]             # monotone and linear: no barrier under either definition
    assert barriers(curve) == {"path": pytest.approx(0.0), "midpoint": pytest.approx(0.0)}
    curve["value"] = [1.0, 1.5, 3.0]             # below the chord
    assert barriers(curve)["path"] == pytest.approx(0.0)
    assert barriers(curve)["midpoint"] == pytest.approx(-0.5)
    acc = pd.DataFrame({"lam": [0.0, 0.5, 1.0], "metric": "accuracy", "value": [0.9, 0.5, 0.8]})
    assert barriers(acc, "accuracy")["path"] == pytest.approx(0.35)
    with pytest.raises(ValidationError, match="ends"):
        barriers(curve[curve["lam"] < 1.0])


def test_loss_plane_coordinates_and_values():
    a = {"w": torch.zeros(2, 2)}
    b = {"w": torch.tensor([[2.0, 0.0], [0.0, 0.0]])}
    c = {"w": torch.tensor([[1.0, 3.0], [0.0, 0.0]])}
    _, _, _, _, coords = plane_basis([a, b, c])
    assert coords == [(0.0, 0.0), (2.0, 0.0), (1.0, 3.0)]
    grid, points = loss_plane([a, b, c], lambda sd: {"loss": float(sd["w"][0, 0] + sd["w"][0, 1])}, resolution=5,
                              margin=0.0)
    assert len(grid) == 25 and list(points["model"]) == ["A", "B", "C"]
    row = grid[(grid.x == 2.0) & (grid.y == 3.0)]
    assert float(row["value"].iloc[0]) == pytest.approx(5.0)   # w = 2 e1 + 3 e2 -> w00 + w01 = 5
    with pytest.raises(ValidationError, match="collinear"):
        plane_basis([a, b, {"w": 2 * b["w"]}])


def test_invert_is_an_inverse():
    p = torch.randperm(17, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p[invert(p)], torch.arange(17))


def test_figures_share_one_colour_scale_and_mark_the_models():
    from analysis.plots.alignment import interpolation_figure, plane_figure
    a = {"w": torch.zeros(2)}
    b = {"w": torch.tensor([1.0, 0.0])}
    c = {"w": torch.tensor([0.0, 1.0])}
    naive = loss_plane([a, b, c], lambda sd: {"loss": 1.0 + float(sd["w"].pow(2).sum())}, resolution=3)
    aligned = loss_plane([a, b, c], lambda sd: {"loss": 0.5 + float(sd["w"].sum().abs())}, resolution=3)
    fig = plane_figure({"naive": naive, "aligned": aligned})
    contours = [t for t in fig.data if t.type == "contour"]
    assert len(contours) == 2 and contours[0].zmin == contours[1].zmin and contours[0].zmax == contours[1].zmax
    assert [list(t.text) for t in fig.data if t.type == "scatter"] == [["A", "B", "C"]] * 2
    curves = pd.DataFrame({"lam": [0.0, 1.0] * 2, "metric": "loss", "value": [1.0, 1.0, 1.0, 2.0],
                           "method": ["naive"] * 2 + ["weight matching"] * 2})
    assert [t.name for t in interpolation_figure(curves).data] == ["naive", "weight matching"]


def test_cycle_error_is_zero_for_pairwise_matching_of_permuted_copies(models):
    # a known answer that fixes the direction of the composition in cycle_error
    a = models[0]
    spec = mlp_spec_from_state_dict(a)
    cp = [a] + [apply_permutation(a, spec, random_perms(spec.sizes(a), s)) for s in (21, 22)]
    maps = [weight_matching(cp[i], cp[j], spec) for i, j in ((0, 1), (1, 2), (2, 0))]
    assert all(v == 0.0 for v in cycle_error(maps).values())
    shuffled = [maps[0], maps[1], {g: torch.roll(p, 1) for g, p in maps[2].items()}]
    assert all(v == 1.0 for v in cycle_error(shuffled).values())


def test_barriers_agree_with_the_landscape_module():
    landscape = pytest.importorskip("analysis.landscape")
    curve = pd.DataFrame({"lam": [0.0, 0.25, 0.5, 0.75, 1.0] * 2, "metric": ["loss"] * 5 + ["accuracy"] * 5,
                          "value": [0.3, 0.9, 1.4, 0.6, 0.2, 0.95, 0.7, 0.5, 0.8, 0.96]})
    theirs = landscape.barriers(curve.assign(task="mnist")).set_index(["metric", "definition"])["value"]
    for metric in ("loss", "accuracy"):
        ours = barriers(curve, metric)
        assert ours["midpoint"] == pytest.approx(theirs[(metric, "midpoint")])
        assert ours["path"] == pytest.approx(theirs[(metric, "path")])


def test_activation_matching_recovers_a_random_permutation_of_an_mlp(models, digits):
    from analysis.permutation.activation_matching import activation_matching
    from analysis.permutation.mlp import mlp_group_features
    a = models[0]
    spec = mlp_spec_from_state_dict(a)
    perms = random_perms(spec.sizes(a), 8)
    b = apply_permutation(a, spec, perms)
    x = digits[0][0]
    found = activation_matching(a, b, spec, mlp_group_features, x)
    # units that never fire on the data (dead ReLUs) have no correlation to match by: every live unit is recovered
    live = {g: f[0].std(0) > 0 for g, f in mlp_group_features(a, x).items()}
    for g in perms:
        assert 0 < int(live[g].sum()) and torch.equal(perms[g][found[g]][live[g]], torch.arange(len(found[g]))[live[g]])
    torch.testing.assert_close(mlp_forward(apply_permutation(b, spec, found), x), mlp_forward(a, x))
    # on another seed it also beats naive averaging
    (_, _), (xt, yt) = digits
    naive = evaluate_mlp(merge_models(models, spec, "none"), xt, yt)["accuracy"]
    am = evaluate_mlp(merge_models(models, spec, "activation_matching", match_x=digits[0][0]), xt, yt)["accuracy"]
    assert am > naive + 0.2


def test_the_mlp_evaluator_scores_a_whole_path_as_its_points_one_by_one(models, digits):
    """MLPEvaluator.along reuses the ends' first-layer pre-activations (linear in λ): the same loss and
    accuracy as evaluating every interpolated model, also with several batches."""
    from analysis.permutation.barrier import interpolate
    from analysis.permutation.mlp import MLPEvaluator
    _, (xt, yt) = digits
    a, b = models[0], models[1]
    lams = [0.0, 0.2, 0.5, 0.9, 1.0]
    for batch_size in (8192, 100):
        ev = MLPEvaluator(xt, yt, batch_size=batch_size)
        whole = ev.along(a, b, lams)
        for lam, got in zip(lams, whole):
            want = evaluate_mlp(interpolate(a, b, lam), xt, yt)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
            assert got["accuracy"] == want["accuracy"]
    table = interpolation_curve(MLPEvaluator(xt, yt), a, b, lams)
    slow = interpolation_curve(lambda sd: evaluate_mlp(sd, xt, yt), a, b, lams)
    pd.testing.assert_frame_equal(table, slow, atol=1e-5, rtol=0)
