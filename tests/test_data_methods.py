"""Fisher merging and RegMean against answers known by construction."""
from __future__ import annotations

import torch

from analysis.merging.fisher import fisher_average
from analysis.merging.regmean import regmean_solve, shrink


def test_fisher_average_with_equal_fishers_is_the_mean():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(4, 5, 3, generator=g)
    f = torch.rand(5, 3, generator=g).expand(4, 5, 3)
    torch.testing.assert_close(fisher_average(taus, f, 1e-6), taus.mean(0))


def test_fisher_average_follows_the_only_sensitive_task():
    taus = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f = torch.tensor([[1.0, 0.0], [0.0, 0.0]])           # entry 0: only task 0 matters; entry 1: none
    out = fisher_average(taus, f, 1e-6)
    assert abs(float(out[0]) - 1.0) < 1e-5               # task 0's value
    assert abs(float(out[1]) - 3.0) < 1e-6               # nobody sensitive: the plain average


def test_regmean_with_equal_grams_is_the_average():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    grams = (x.T @ x).expand(3, 4, 4)
    torch.testing.assert_close(regmean_solve(taus, grams), taus.mean(0))
    # shrinkage keeps equal Grams equal, so the answer does not move
    torch.testing.assert_close(regmean_solve(taus, grams, 0.3), taus.mean(0))


def test_regmean_of_linear_regressions_is_the_joint_least_squares_solution():
    g = torch.Generator().manual_seed(2)
    d_in, d_out = 5, 3
    xs, ys, ws = [], [], []
    for t in range(3):
        x = torch.randn(40 + 10 * t, d_in, generator=g, dtype=torch.float64) * (1 + t)
        w_true = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        y = x @ w_true.T + 0.3 * torch.randn(x.shape[0], d_out, generator=g, dtype=torch.float64)
        w_t = torch.linalg.lstsq(x, y).solution.T           # each task's own least-squares fit
        xs.append(x), ys.append(y), ws.append(w_t)
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    grams = torch.stack([x.T @ x for x in xs])
    torch.testing.assert_close(regmean_solve(torch.stack(ws), grams), joint, rtol=1e-9, atol=1e-9)


def test_shrink_scales_only_the_off_diagonal():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(shrink(gram, 0.5), torch.tensor([[4.0, 1.0], [1.0, 9.0]]))
    torch.testing.assert_close(shrink(gram, 0.0), torch.diag(torch.tensor([4.0, 9.0])))


def test_regmean_with_a_singular_gram_sum_uses_the_pseudo_inverse():
    taus = torch.tensor([[[1.0, 5.0]], [[3.0, 7.0]]], dtype=torch.float64)   # (T=2, out=1, in=2)
    grams = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    out = regmean_solve(taus, grams)
    assert torch.isfinite(out).all()
    assert abs(float(out[0, 0]) - 2.0) < 1e-12   # the seen feature: the (equal-Gram) average
