"""Known answers for paths and barriers (analysis/landscape.py)."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.errors import ValidationError
from analysis.landscape import (barrier_table, barriers, delta_path, interpolate, lambda_grid, linear_path,
                                scaling_path)


def quadratic_eval(params, c=5.0):
    """L(θ) = c − θ0² (a saddle direction): along a line the loss is a concave parabola."""
    th = params["w"]
    loss = c - float(th[0]) ** 2
    return pd.DataFrame([{"task": "q", "metric": "loss", "value": loss},
                         {"task": "q", "metric": "accuracy", "value": -loss}])


def test_quadratic_barriers_match_closed_form():
    # a = -1, b = 2: θ0(λ) = 3λ − 1, L(λ) = c − (3λ−1)², L(0) = c−1, L(1) = c−4.
    # max over path: max_λ L(λ) − ((1−λ)L0 + λL1) = max −9λ² + 9λ = 9/4 at λ = 1/2
    # midpoint:      L(½) − ½(L0+L1) = (c − 0.25) − (c − 2.5) = 2.25
    a, b = {"w": torch.tensor([-1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}
    grid = np.arange(7) / 6.0  # holds 1/2
    curves = linear_path(quadratic_eval, a, b, grid)
    assert len(curves) == 7 * 2 and set(curves.columns) >= {"lam", "task", "metric", "value"}
    bar = barriers(curves).set_index(["metric", "definition"])
    assert bar.loc[("loss", "path"), "value"] == pytest.approx(2.25)
    assert bar.loc[("loss", "path"), "at"] == pytest.approx(0.5)
    assert bar.loc[("loss", "midpoint"), "value"] == pytest.approx(2.25)
    assert bar.loc[("loss", "midpoint"), "at"] == pytest.approx(0.5)
    # "accuracy" here is −L: higher is better, so its barrier is the same drop
    assert bar.loc[("accuracy", "path"), "value"] == pytest.approx(2.25)
    assert bar.loc[("accuracy", "midpoint"), "value"] == pytest.approx(2.25)
    wide = barrier_table(barriers(curves))
    assert wide.shape[0] == 1
    assert list(wide.columns) == ["task", "max-over-path barrier", "midpoint barrier", "λ of the max-over-path barrier"]
    assert barrier_table(barriers(curves), "accuracy", scale=100)["midpoint barrier"].iloc[0] == pytest.approx(225.0)


def test_monotone_linear_curve_has_no_barrier_under_either_definition():
    # the endpoint bug: L rising linearly from 0.2 to 0.264 used to read a "barrier" of 0.032 at λ = 1
    ev = lambda p: pd.DataFrame([{"task": "q", "metric": "loss", "value": 0.2 + 0.064 * float(p["w"][0])},
                                 {"task": "q", "metric": "accuracy", "value": 0.9 - 0.1 * float(p["w"][0])}])
    for points in (5, 6, 11):   # 6: λ = ½ is not on the grid and is read off its neighbours
        bar = barriers(linear_path(ev, {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, points))
        assert np.allclose(bar["value"], 0.0, atol=1e-6), (points, bar)


def test_convex_path_has_no_positive_max_over_path_barrier():
    # L = θ0²: convex, so L(λ) ≤ the chord everywhere; the max-over-path barrier is 0 (at an end),
    # the midpoint barrier negative (the path bends below the chord)
    ev = lambda p: pd.DataFrame([{"task": "q", "metric": "loss", "value": float(p["w"][0]) ** 2}])
    bar = barriers(linear_path(ev, {"w": torch.tensor([-1.0])}, {"w": torch.tensor([3.0])}, 11)).set_index("definition")
    assert bar.loc["path", "value"] == pytest.approx(0.0, abs=1e-12)
    assert bar.loc["midpoint", "value"] == pytest.approx(1.0 - 5.0)   # L(½) = 1, ½(1 + 9) = 5


def test_identical_endpoints_have_zero_barrier(tiny_workspace):
    ws = tiny_workspace
    ev = functools.partial(ws.evaluator.evaluate, split="validation")
    ft = ws.tvs.apply(ws.tvs.task_vector("alpha"))
    curves = linear_path(ev, ft, ft, 5)
    bar = barriers(curves)
    assert np.allclose(bar["value"], 0.0, atol=1e-6)
    # every point equals the endpoint's own evaluation
    end = ev(ft).set_index(["task", "metric"])["value"]
    for lam, g in curves.groupby("lam"):
        assert np.allclose(g.set_index(["task", "metric"])["value"].loc[end.index], end, atol=1e-6)


def test_delta_path_equals_full_model_path(tiny_workspace):
    ws, tvs = tiny_workspace, tiny_workspace.tvs
    ev = functools.partial(ws.evaluator.evaluate, split="validation")
    base = tvs.apply({})
    da, db = tvs.task_vector("alpha"), tvs.task_vector("beta")
    full = linear_path(ev, tvs.apply(da), tvs.apply(db), 4)
    fast = delta_path(ev, base, da, db, 4)
    assert np.allclose(full["value"], fast["value"], atol=1e-5)


def test_delta_path_points_are_the_models_on_the_line_exactly_at_its_ends():
    seen = []
    ev = lambda p: (seen.append(p), pd.DataFrame([{"task": "t", "metric": "loss", "value": 0.0}]))[1]
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=g), "v": torch.randn(4, generator=g), "ids": torch.arange(3)}
    da = {"w": torch.randn(5, 3, generator=g), "v": torch.randn(4, generator=g)}
    db = {"w": torch.randn(5, 3, generator=g)}                  # no "v": zero there
    delta_path(ev, base, da, db, [0.0, 0.25, 1.0])
    assert torch.equal(seen[0]["w"], base["w"] + da["w"]) and torch.equal(seen[2]["w"], base["w"] + db["w"])
    assert torch.equal(seen[0]["v"], base["v"] + da["v"]) and torch.equal(seen[2]["v"], base["v"])
    torch.testing.assert_close(seen[1]["w"], base["w"] + 0.75 * da["w"] + 0.25 * db["w"])
    torch.testing.assert_close(seen[1]["v"], base["v"] + 0.75 * da["v"])
    assert seen[1]["ids"] is base["ids"]                        # tensors no delta touches: the base's own
    with pytest.raises(ValidationError, match="'u'"):
        delta_path(ev, base, {"u": torch.zeros(2)}, {}, 3)


def test_a_path_stops_as_soon_as_it_is_told(tiny_workspace):
    from analysis.evaluation import ScoringStopped
    ws, tvs = tiny_workspace, tiny_workspace.tvs
    forwards = []
    ws.evaluator.backbone.register_forward_hook(lambda *a: forwards.append(1))
    ev = functools.partial(ws.evaluator.evaluate, subsample=40, stop=lambda: len(forwards) >= 1)
    with pytest.raises(ScoringStopped):
        delta_path(ev, tvs.apply({}), tvs.task_vector("alpha"), tvs.task_vector("beta"), 5)
    assert len(forwards) == 1      # of the first point's 3 tasks × 3 batches


def test_scaling_path_hits_known_parameters():
    seen = []
    ev = lambda p: (seen.append(p["w"].clone()), pd.DataFrame([{"task": "t", "metric": "loss", "value": 0.0}]))[1]
    base, delta = {"w": torch.tensor([1.0, 1.0]), "buf": torch.tensor([7])}, {"w": torch.tensor([2.0, -1.0])}
    out = scaling_path(ev, base, delta, [0.0, 0.5, 2.0])
    assert list(out["alpha"]) == [0.0, 0.5, 2.0]
    assert torch.allclose(seen[1], torch.tensor([2.0, 0.5])) and torch.allclose(seen[2], torch.tensor([5.0, -1.0]))


def test_interpolate_keeps_buffers_and_rejects_mismatch():
    a = {"w": torch.zeros(2), "ids": torch.tensor([0, 1])}
    b = {"w": torch.ones(2), "ids": torch.tensor([5, 6])}
    mid = interpolate(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.full((2,), 0.25)) and torch.equal(mid["ids"], a["ids"])
    with pytest.raises(ValidationError, match="different tensors"):
        interpolate(a, {"w": torch.ones(2)}, 0.5)
    with pytest.raises(ValidationError, match="shape"):
        interpolate({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)


def test_barriers_need_both_ends_and_tidy_input():
    df = pd.DataFrame({"lam": [0.0, 0.5], "task": "t", "metric": "loss", "value": [1.0, 2.0]})
    with pytest.raises(ValidationError, match="λ = 0 and λ = 1"):
        barriers(df)
    with pytest.raises(ValidationError, match="tidy"):
        linear_path(lambda p: pd.DataFrame({"x": [1]}), {"w": torch.zeros(1)}, {"w": torch.ones(1)}, 2)
    with pytest.raises(ValidationError, match="at least 2"):
        lambda_grid(1)
