"""AppTests of the Spectra and Interference pages on a tiny injected set."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.taskvectors import TaskVectorSet
from ui.state import Workspace

ROOT = Path(__file__).resolve().parents[1]


def _tiny_workspace(name="tiny-spectra", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {f"encoder.layer.{i}.{p}": torch.zeros(12, 8) for i in range(3) for p in ("query.weight", "out.weight")}
    base["encoder.norm.weight"] = torch.ones(8)
    tasks = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b", "c")}
    return Workspace(name=name, tvs=TaskVectorSet.from_state_dicts(base, tasks))


def _app(path: str, ws) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=120)
    at.session_state["workspace"] = ws
    return at.run()


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_spectra_page_renders_and_slider_changes_the_table():
    ws = _tiny_workspace()
    at = _app("pages/1_Spectra.py", ws)
    _no_errors(at)
    assert at.title[0].value == "Spectra"
    table = at.dataframe[0].value
    assert list(table["task"]) == ["a", "b", "c"]
    before = table["mean relative error (%)"].tolist()
    at.slider(key="spectra_rank_fraction").set_value(0.75).run()
    _no_errors(at)
    after = at.dataframe[0].value["mean relative error (%)"].tolist()
    assert all(x < y for x, y in zip(after, before))      # more rank kept, less error
    at.selectbox(key="spectra_layer").set_value("encoder.layer.2.out.weight").run()
    _no_errors(at)
    assert "accuracy needs labelled data" in " ".join(i.value for i in at.info).lower()


def test_on_a_new_set_the_shown_layer_is_drawn_before_the_others_are_decomposed(monkeypatch):
    from analysis.spectra import SpectralCache
    from ui.state import spectral_cache
    looked_before_computing = []
    compute = SpectralCache._compute

    def spy(self):
        looked_before_computing.append(sorted(self._first_looks))
        return compute(self)
    monkeypatch.setattr(SpectralCache, "_compute", spy)
    ws = _tiny_workspace("tiny-spectra-first-look", seed=7)    # content no other test decomposes
    at = _app("pages/1_Spectra.py", ws)
    _no_errors(at)
    cache = spectral_cache(ws, ws.key)
    assert looked_before_computing == [[cache.names[0]]]      # the default layer alone, then the rest
    shown = [c for c in at.get("plotly_chart") if "spectra_spectrum" in (c.proto.id or "")]
    warm = _app("pages/1_Spectra.py", ws)                     # the cache computed: no first look
    assert len(shown) == 1 and len(at.get("plotly_chart")) == len(warm.get("plotly_chart"))  # replaced, not stacked
    at.selectbox(key="spectra_layer").set_value(cache.names[2]).run()
    _no_errors(at)
    assert looked_before_computing == [[cache.names[0]]]      # a computed cache: no more first looks


def test_spectra_page_slider_does_not_recompute_svds():
    from ui.state import spectral_cache
    ws = _tiny_workspace("tiny-spectra-count")
    at = _app("pages/1_Spectra.py", ws)
    cache = spectral_cache(ws, ws.key)
    count = cache.compute_count
    for f in (0.2, 0.9, 0.5):
        at.slider(key="spectra_rank_fraction").set_value(f).run()
    at = _app("pages/2_Interference.py", ws)
    at.slider(key="interference_rank_fraction").set_value(0.6).run()
    _no_errors(at)
    assert spectral_cache(ws, ws.key) is cache and cache.compute_count == count


def test_interference_page_renders_and_slider_changes_sti():
    ws = _tiny_workspace("tiny-interference")
    at = _app("pages/2_Interference.py", ws)
    _no_errors(at)
    sti = at.dataframe[0].value
    assert {"param", "depth", "sti"} <= set(sti.columns) and len(sti) == 6
    at.slider(key="interference_rank_fraction").set_value(0.9).run()
    _no_errors(at)
    sti2 = at.dataframe[0].value
    assert (sti2["rank"] > sti["rank"]).all() and not sti2["sti"].equals(sti["sti"])
    at.selectbox(key="interference_scope").set_value("block 1").run()
    _no_errors(at)
    at.radio(key="interference_by_layer").set_value("sign-conflict rate").run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) >= 5


def test_pages_ask_for_a_workspace_when_none_is_loaded():
    for page in ("pages/1_Spectra.py", "pages/2_Interference.py"):
        at = AppTest.from_file(str(ROOT / page), default_timeout=60).run()
        assert not at.exception
        assert "No task-vector set is loaded" in at.info[0].value


@pytest.mark.slow
def test_spectra_page_tsvc_accuracy_button(tiny_workspace):
    at = _app("pages/1_Spectra.py", tiny_workspace)
    _no_errors(at)
    at.multiselect(key="spectra_tsvc_fracs").set_value([0.1])
    at.button(key="spectra_tsvc_run").click().run()
    _no_errors(at)
    acc = at.dataframe[-1].value   # the accuracy table is the page's last table
    assert list(acc.index) == ["alpha", "beta", "gamma"]
    assert set(acc.columns) == {"10 % of the rank", "100 % of the rank"}


@pytest.mark.parametrize("page,key", [("pages/1_Spectra.py", "spectra_rank_fraction"),
                                      ("pages/2_Interference.py", "interference_rank_fraction")])
def test_rank_sliders_stop_at_the_directions_the_spectral_cache_keeps(monkeypatch, page, key):
    """keep=0.5 on rank-8 matrices keeps K = 4 directions: the slider offers f <= 0.5 and says why."""
    monkeypatch.setenv("MERGESCOPE_SPECTRA_KEEP", "0.5")
    ws = _tiny_workspace(f"tiny-spectra-keep-{key}")
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.session_state["workspace"] = ws
    at.query_params["sp_f" if "spectra" in key else "if_f"] = "0.9"   # a link asking past K is not obeyed
    at.run()
    _no_errors(at)
    slider = at.slider(key=key)
    assert slider.max == 0.5 and slider.value <= 0.5
    assert any("keeps only the top singular directions" in c.value for c in at.caption)
    slider.set_value(0.5).run()
    _no_errors(at)
