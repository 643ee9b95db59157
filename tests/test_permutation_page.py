"""AppTest of pages/6_Alignment.py on tiny digits MLPs injected through
st.session_state["alignment_models"]."""
from __future__ import annotations

import pytest
from pagetest import run_page

from analysis.permutation.mlp import train_small_mlp

PAGE = "6_Alignment.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def injected(digits_xy):
    x, y = digits_xy
    models = {f"seed {s}": train_small_mlp(x[:1200], y[:1200], (64, 16, 16, 10), seed=s, epochs=15, batch_size=128)
              for s in range(3)}
    return {"models": models, "train_x": x[:1200], "test": (x[1200:1500], y[1200:1500]), "label": "tiny digits"}


def _page(models, **state):
    return run_page(PAGE, alignment_models=models, **state)


def test_page_shows_paths_barriers_merge_and_cycle_error(injected):
    at = _page(injected, al_merge_on=True)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    tables = [t.value for t in at.dataframe]
    bars = next(t for t in tables if "midpoint barrier" in t.columns)
    assert set(bars["method"]) == {"naive", "weight matching"}
    loss = bars[bars.metric == "loss"].set_index("method")
    assert loss.loc["weight matching", "midpoint barrier"] < loss.loc["naive", "midpoint barrier"]
    merged = next(t for t in tables if "model" in t.columns)
    assert len(merged) == 4 and merged["model"].iloc[-1].startswith("merge of 3")
    cyc = next(t for t in tables if "h0" in t.columns)
    assert (cyc.loc["C2M3"] == 0.0).all()


def test_switching_method_and_repair_changes_the_curves(injected):
    at = _page(injected, al_method="c2m3", al_repair=True, al_plane_on=True, al_res=5)
    assert not at.exception, at.exception
    bars = next(t.value for t in at.dataframe if "midpoint barrier" in t.value.columns)
    assert set(bars["method"]) == {"naive", "C2M3", "C2M3 + REPAIR"}
    assert len(at.get("plotly_chart")) == 3  # loss and accuracy paths, and the plane
    assert not any("h0" in t.value.columns for t in at.dataframe)  # the merge is opt-in


def test_page_without_models_asks_to_build_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path))
    at = run_page(PAGE)
    assert not at.exception, at.exception
    assert any("Build the demo first" in i.value for i in at.info)


def test_more_points_on_the_path_do_not_align_again(injected, monkeypatch):
    import streamlit as st

    from analysis.permutation import pipeline
    st.cache_data.clear()                           # earlier tests cached this pair's alignment
    calls = []
    real = pipeline.weight_matching
    monkeypatch.setattr(pipeline, "weight_matching", lambda *a, **k: calls.append(1) or real(*a, **k))
    at = _page(injected, al_lam=7)
    assert not at.exception, at.exception
    first = len(calls)
    assert first >= 1
    at.slider(key="al_lam").set_value(9).run()
    assert not at.exception, at.exception
    bars = next(t.value for t in at.dataframe if "midpoint barrier" in t.value.columns)
    assert set(bars["method"]) == {"naive", "weight matching"}
    assert len(calls) == first                      # the path has new points, B keeps its alignment
