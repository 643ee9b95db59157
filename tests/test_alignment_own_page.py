"""AppTest of the Alignment page's "Your own transformers" form: two BERT folders (the second an exact
permuted copy of the first) and a labelled CSV, given through the form or a link's al_own_* parameters,
replace the transformer zoo in the path, merge and latent-space sections. No MNIST demo is built in the
test cache: the transformer section works without it."""
from __future__ import annotations

import pytest
from pagetest import PAGES, run_page
from streamlit.testing.v1 import AppTest
from tinybert import permuted_bert_pair

PAGE = "6_Alignment.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECTIONS = {"tr_path_on": True, "tr_merge_on": True, "tr_latent_on": True, "tr_agg_on": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return permuted_bert_pair(tmp_path_factory.mktemp("own_page"))


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path))


def _check_sections(at, pair):
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("Build the demo first" in i.value for i in at.info)      # no MLPs: the page went on regardless
    assert any("classifier on the pooler" in c.value for c in at.caption)
    tables = [t.value for t in at.dataframe]
    bars = next(t for t in tables if "max-over-path barrier" in t.columns).set_index(["method", "metric"])
    assert abs(bars.loc[("weight matching", "loss"), "max-over-path barrier"]) < 1e-5
    assert bars.loc[("naive", "loss"), "max-over-path barrier"] > 0.05
    merged = next(t for t in tables if "model" in t.columns and t["model"].astype(str).str.contains("C2M3").any())
    acc = merged.set_index("model")["accuracy"]
    naive = acc.index.str.contains("naive")
    assert set(acc.index[:2]) == {"seed_a", "seed_b"} and (acc[~naive] == 1.0).all()   # every aligned merge
    assert (acc[naive] < 1.0).all()                                                     # is the model itself
    sim = next(t for t in tables if "pooler" in t.columns)["pooler"]
    assert sim[("B vs A, before alignment", "linear CKA")] == pytest.approx(1.0, abs=1e-5)
    assert sim[("B vs A, after alignment", "mean unit correlation")] == pytest.approx(1.0, abs=1e-5)
    agg = next(t for t in tables if "space" in t.columns)
    assert "aggregated relative" in set(agg["space"])


def test_the_form_replaces_the_zoo_and_goes_into_the_url(pair):
    at = AppTest.from_file(str(PAGES / PAGE), default_timeout=600).run()
    assert not at.exception, at.exception
    assert any("No transformer zoo built yet" in i.value for i in at.info)
    at.text_area(key="al_own_folders").input(f"{pair['a']}\n{pair['b']}\n")
    at.text_input(key="al_own_data_path").input(str(pair["data"]))
    next(b for b in at.button if b.label == "Align these transformers").click().run()
    assert not at.exception, at.exception
    assert at.query_params["al_own_model"] == [str(pair["a"]), str(pair["b"])]
    assert at.query_params["al_own_data"] in (str(pair["data"]), [str(pair["data"])])
    for key, value in SECTIONS.items():
        at.toggle(key=key).set_value(value)
    at.run()
    _check_sections(at, pair)
    at.button(key="al_own_clear").click().run()        # back to the (unbuilt) zoo, and out of the URL
    assert "al_own_model" not in at.query_params
    assert any("No transformer zoo built yet" in i.value for i in at.info)


def test_a_link_restores_the_view(pair):
    at = run_page(PAGE, query={"al_own_model": [str(pair["a"]), str(pair["b"])], "al_own_data": str(pair["data"])},
                  timeout=600, **SECTIONS)
    _check_sections(at, pair)
    assert at.text_area(key="al_own_folders").value == f"{pair['a']}\n{pair['b']}"


def test_a_bad_folder_is_named_on_the_page(pair, tmp_path):
    missing = tmp_path / "not_here"
    at = run_page(PAGE, query={"al_own_model": [str(pair["a"]), str(missing)], "al_own_data": str(pair["data"])})
    assert not at.exception, at.exception
    assert any(f"{missing}: not a Hugging Face model folder" in e.value for e in at.error)
    assert not any("No transformer zoo built yet" in i.value for i in at.info)
