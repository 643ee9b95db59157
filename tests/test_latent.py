"""Known-answer tests of relative representations, linear CKA and relative
latent space aggregation (analysis/latent.py), on synthetic latents and on
digits MLPs (permuted copies and different seeds)."""
from __future__ import annotations

import pytest
import torch

from analysis.errors import ValidationError
from analysis.latent import (aggregation_table, choose_anchors, linear_cka, mean_unit_correlation,
                             relative_representation, relative_similarity, similarity_by_layer)
from analysis.permutation import apply_permutation, mlp_spec_from_state_dict, random_perms, weight_matching
from analysis.permutation.mlp import mlp_layer_features, train_small_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_relative_representations_are_invariant_to_rotation_and_rescaling():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 12, generator=g, dtype=torch.float64)
    idx = choose_anchors(50, 10, seed=1)
    rel = relative_representation(z, z[idx])
    for transformed in (z @ _orthogonal(12, 2), 7.5 * z, 0.01 * z @ _orthogonal(12, 3)):
        torch.testing.assert_close(relative_representation(transformed, transformed[idx]), rel, atol=1e-5, rtol=0)
        assert relative_similarity(relative_representation(transformed, transformed[idx]), rel) == pytest.approx(1.0)
    # not invariant to a translation or a generic linear map: the property is not vacuous
    shifted = z + 3.0
    assert (relative_representation(shifted, shifted[idx]) - rel).abs().max() > 0.1
    skew = z @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    assert (relative_representation(skew, skew[idx]) - rel).abs().max() > 0.1
    # a known value: anchors equal to the samples give 1 on the diagonal
    torch.testing.assert_close(torch.diagonal(relative_representation(z[idx], z[idx])), torch.ones(10))
    with pytest.raises(ValidationError, match="12 features but anchors have 5"):
        relative_representation(z, z[:3, :5])


def test_linear_cka_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ _orthogonal(8, 1) + 2.0) == pytest.approx(1.0)    # rotation, scale, shift
    assert linear_cka(x, x[:, torch.randperm(8, generator=g)]) == pytest.approx(1.0)  # a permutation of units
    assert linear_cka(x, torch.randn(200, 8, generator=g, dtype=torch.float64)) < 0.15
    # hand value: x = [1, 2, 3], y = [1, 3, 2] (one feature each) -> CKA = corr^2 = 0.25
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [3.0], [2.0]])) == pytest.approx(0.25)
    perm = torch.randperm(8, generator=g)
    assert mean_unit_correlation(x, x) == pytest.approx(1.0)
    assert mean_unit_correlation(x, x[:, perm]) < 0.5


def test_aggregation_of_rotated_spaces_keeps_the_probe_and_stitches():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 10, generator=g, dtype=torch.float64) * 2
    y = torch.arange(300) % 3
    z = centres[y] + torch.randn(300, 10, generator=g, dtype=torch.float64)
    models = {f"m{i}": z @ _orthogonal(10, 10 + i) * (i + 1) for i in range(3)}
    train = {k: v[:200] for k, v in models.items()}
    test = {k: v[200:] for k, v in models.items()}
    table = aggregation_table(train, y[:200], test, y[200:], n_anchors=30)
    acc = table.set_index(["space", "model"])["accuracy"]
    single = acc.xs("relative", level="space")
    assert acc[("aggregated relative", "all")] == pytest.approx(single.mean(), abs=0.02)
    assert single.min() > 0.8
    # relative spaces are interchangeable across models; rotated absolute spaces are not
    assert acc[("relative, zero-shot stitching", "mean of pairs")] == pytest.approx(single.mean(), abs=0.02)
    assert acc[("absolute, zero-shot stitching", "mean of pairs")] < single.mean() - 0.2


@pytest.fixture(scope="module")
def mlps(digits_xy):
    x, y = digits_xy
    return [train_small_mlp(x[:1200], y[:1200], (64, 32, 32, 10), seed=s, epochs=15, batch_size=128)
            for s in range(2)], (x, y)


def test_mlp_layers_cka_is_unchanged_by_alignment_and_unit_correlation_rises(mlps):
    (a, b), (x, _) = mlps
    spec = mlp_spec_from_state_dict(a)
    xs = x[1200:1500]
    idx = choose_anchors(len(xs), 50)
    # a permuted copy: CKA and relative similarity 1 before alignment, unit correlation only after
    copy = apply_permutation(a, spec, random_perms(spec.sizes(a), 3))
    fa = mlp_layer_features(a, xs)
    before = similarity_by_layer(fa, mlp_layer_features(copy, xs), idx).set_index(["layer", "measure"])["value"]
    assert before[("layer 1", "linear CKA")] == pytest.approx(1.0)
    assert before[("layer 2", "relative similarity")] == pytest.approx(1.0)
    assert before[("layer 1", "mean unit correlation")] < 0.5
    assert before[("output", "mean unit correlation")] == pytest.approx(1.0)   # logits are never permuted
    # another seed: alignment relabels units only, so CKA is unchanged and unit correlation rises
    aligned = apply_permutation(b, spec, weight_matching(a, b, spec))
    fb, fal = mlp_layer_features(b, xs), mlp_layer_features(aligned, xs)
    t0 = similarity_by_layer(fa, fb, idx).set_index(["layer", "measure"])["value"]
    t1 = similarity_by_layer(fa, fal, idx).set_index(["layer", "measure"])["value"]
    for layer in ("layer 1", "layer 2"):
        # equal up to float32 rounding: the aligned model's features are B's, permuted, but its next layer
        # sums its inputs in another order (2.3e-9 apart with numpy 2.4.6 / transformers 5.25 on this CPU)
        assert t1[(layer, "linear CKA")] == pytest.approx(t0[(layer, "linear CKA")], abs=1e-6)
        assert t1[(layer, "relative similarity")] == pytest.approx(t0[(layer, "relative similarity")], abs=1e-6)
        assert t1[(layer, "mean unit correlation")] > t0[(layer, "mean unit correlation")] + 0.2
    # the two seeds' relative spaces aggregate: a probe on the mean is as good as the single ones
    tr = {f"seed {i}": mlp_layer_features(m, x[:1200])["layer 2"] for i, m in enumerate((a, b))}
    te = {f"seed {i}": mlp_layer_features(m, x[1200:])["layer 2"] for i, m in enumerate((a, b))}
    y = mlps[1][1]
    acc = aggregation_table(tr, y[:1200], te, y[1200:], n_anchors=64).set_index(
        ["space", "model"])["accuracy"]
    assert acc[("aggregated relative", "all")] >= acc.xs("relative", level="space").min() - 0.02
