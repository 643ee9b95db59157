"""AppTest of pages/7_Curvature.py on the tiny workspace.

The tiny workspace's evaluator does not have the data API yet on this branch
(`fisher_diagonal`, `linear_input_grams`), so these tests replace
`MergeInputs.fisher` / `MergeInputs.activation_grams` with synthetic,
deterministic statistics of the right shapes."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pagetest import run_page, url_params

from analysis.merging.inputs import MergeInputs

PAGE = "7_Curvature.py"
CALLS = {"fisher": 0, "grams": 0}


def _fisher(self, n=256, split="train", seed=0):
    CALLS["fisher"] += 1
    g = torch.Generator().manual_seed(n)
    return {t: {name: torch.rand(self.tvs.shape(name), generator=g) ** (1 + i) for name in self.tvs.param_names}
            for i, t in enumerate(self.tvs.tasks)}


def _grams(self, n=256, split="train", seed=0):
    CALLS["grams"] += 1
    g = torch.Generator().manual_seed(n)
    out = {}
    for t in self.tvs.tasks:
        stats = {}
        for name in self.tvs.names_of_kind("matrix"):
            x = torch.randn(32, self.tvs.shape(name)[1], generator=g, dtype=torch.float64)
            stats[name], stats[f"rows::{name}"] = x.T @ x, torch.tensor(32.0, dtype=torch.float64)
        out[t] = stats
    return out


@pytest.fixture
def synthetic_statistics(monkeypatch):
    monkeypatch.setattr(MergeInputs, "fisher", _fisher)
    monkeypatch.setattr(MergeInputs, "activation_grams", _grams)
    CALLS.update(fisher=0, grams=0)
    return CALLS


def _tables(at, column):
    return [d.value for d in at.dataframe if column in getattr(d.value, "columns", [])]


def test_renders_fisher_mass_diagnostics_and_departures(tiny_workspace, synthetic_statistics):
    at = run_page(PAGE, tiny_workspace)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="cv_metric").value == "fisher"
    assert at.selectbox(key="cv_metric").options == ["fisher", "kfac_input", "identity"]
    matrices = tiny_workspace.tvs.names_of_kind("matrix", "conv")
    wide = _tables(at, "frechet_variance")[0]
    assert sorted(wide["param"]) == sorted(matrices) and set(wide["curvature"]) == {"fisher"}
    assert (wide["residual_energy"].abs() < 1e-9).all()          # rank 0: the subspace holds every τ_t
    assert (wide["heterogeneity"] > 0).all()                      # the synthetic Fishers differ in shape
    mass = _tables(at, "share")[0]
    assert len(mass) == len(tiny_workspace.tvs.tasks) * len(tiny_workspace.tvs.param_names)
    assert _tables(at, "ta_departure")
    assert len(at.get("plotly_chart")) == 6
    assert synthetic_statistics["fisher"] >= 1
    assert url_params(at) == {"cv_metric": "fisher", "cv_rank": "0", "cv_n": "256"}


def test_metric_and_rank_come_from_the_url_and_go_back_to_it(tiny_workspace, synthetic_statistics):
    at = run_page(PAGE, tiny_workspace, {"cv_metric": "kfac_input", "cv_rank": "1", "cv_n": "128"})
    assert not at.exception, at.exception
    assert at.selectbox(key="cv_metric").value == "kfac_input"
    assert at.select_slider(key="cv_rank").value == 1 and at.select_slider(key="cv_n").value == 128
    wide = _tables(at, "frechet_variance")[0]
    assert set(wide["curvature"]) == {"kfac_input"} and (wide["k"] <= 3).all()
    assert synthetic_statistics["grams"] >= 1
    at.selectbox(key="cv_metric").set_value("identity").run()
    assert not at.exception, at.exception
    assert url_params(at)["cv_metric"] == "identity"
    wide = _tables(at, "frechet_variance")[0]
    assert (wide["flat_departure"].abs() < 1e-9).all()


def test_bad_url_values_fall_back_to_defaults(tiny_workspace, synthetic_statistics):
    at = run_page(PAGE, tiny_workspace, {"cv_metric": "nope", "cv_rank": "99", "cv_n": "abc"})
    assert not at.exception, at.exception
    assert at.selectbox(key="cv_metric").value == "fisher"
    assert at.select_slider(key="cv_rank").value == 0 and at.select_slider(key="cv_n").value == 256


def test_without_labelled_data_offers_the_identity_diagnostics_only(tiny_workspace):
    ws = replace(tiny_workspace, evaluator=None, reference=None)
    at = run_page(PAGE, ws, {"cv_metric": "fisher"})
    assert not at.exception, at.exception
    assert any("No labelled data" in i.value for i in at.info)
    assert at.selectbox(key="cv_metric").options == ["identity"]
    wide = _tables(at, "frechet_variance")[0]
    assert set(wide["curvature"]) == {"identity"}
    assert (wide["ta_departure"].abs() < 1e-6).all()              # identity + task-vector span = task arithmetic
    assert not _tables(at, "share")
