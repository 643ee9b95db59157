"""AppTest of the Alignment page's latent-space and transformer sections, on
tiny digits MLPs and tiny random BERT encoders injected through
st.session_state."""
from __future__ import annotations

import pytest
import torch
from pagetest import run_page, url_params

from analysis.permutation.mlp import train_small_mlp
from analysis.permutation.transformer import head_logits, pack_tokens

PAGE = "6_Alignment.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mlps(digits_xy):
    x, y = digits_xy
    models = {f"seed {s}": train_small_mlp(x[:1200], y[:1200], (64, 16, 16, 10), seed=s, epochs=10, batch_size=128)
              for s in range(3)}
    return {"models": models, "train_x": x[:1200], "test": (x[1200:1600], y[1200:1600]), "label": "tiny digits"}


def _bert(seed):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     max_position_embeddings=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sd = {k: v.detach().clone() for k, v in BertModel(cfg, add_pooling_layer=False).state_dict().items()}
    for k, v in sd.items():
        if v.dim() == 2:
            sd[k] = torch.randn_like(v) / (v.shape[1] ** 0.5 if "embeddings" not in k else 1.0)
    g = torch.Generator().manual_seed(50 + seed)
    sd["heads.toy.weight"], sd["heads.toy.bias"] = torch.randn(2, 16, generator=g), torch.zeros(2)
    return sd


@pytest.fixture(scope="module")
def transformers_src():
    g = torch.Generator().manual_seed(0)
    models = {f"seed {s}": _bert(s) for s in range(3)}
    ids = torch.randint(1, 30, (160, 10), generator=g)
    tok = pack_tokens(ids, torch.ones_like(ids))
    margin = head_logits(models["seed 0"], "toy", tok, 4) @ torch.tensor([1.0, -1.0])
    y = (margin > margin.median()).long()   # balanced labels that model 0's head separates
    data = {"toy": {"train": (tok[:100], y[:100]), "test": (tok[100:], y[100:])}}
    return {"models": models, "n_heads": 4, "eps": 1e-12, "data": data, "label": "tiny random BERTs"}


def test_latent_section_on_mlps(mlps, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path))
    at = run_page(PAGE, alignment_models=mlps, lat_on=True, lat_agg_on=True, lat_anchors=30, al_n_eval=400)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    sim = next(t.value for t in at.dataframe if "layer 1" in t.value.columns)
    sim = sim["layer 1"]
    before = sim[("B vs A, before alignment", "linear CKA")]
    assert sim[("B vs A, after alignment", "linear CKA")] == pytest.approx(before, abs=1e-9)
    assert sim[("B vs A, after alignment", "mean unit correlation")] > sim[("B vs A, before alignment",
                                                                             "mean unit correlation")]
    agg = next(t.value for t in at.dataframe if "space" in t.value.columns)
    assert "aggregated relative" in set(agg["space"])
    # no transformer zoo in this cache: the section says how to build one
    assert any("build-transformers" in i.value for i in at.info)


def test_transformer_section_paths_merges_latent_and_aggregation(mlps, transformers_src):
    at = run_page(PAGE, alignment_models=mlps, alignment_transformers=transformers_src, tr_path_on=True,
                  tr_merge_on=True, tr_latent_on=True, tr_agg_on=True, tr_method="activation_matching",
                  tr_repair=True, timeout=900)   # one run does every section; the shared CPU can be very busy
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    tables = [t.value for t in at.dataframe]
    bars = next(t for t in tables if "max-over-path barrier" in t.columns and "activation matching" in set(t["method"]))
    assert set(bars["method"]) == {"naive", "activation matching", "activation matching + REPAIR"}
    merged = next(t for t in tables if "model" in t.columns and t["model"].astype(str).str.contains("C2M3").any())
    assert len(merged) == 3 + 4
    cyc = next(t for t in tables if "mean cycle error" in t.columns).set_index("method")
    assert cyc.loc["C2M3", "max"] == 0.0
    sim = next(t for t in tables if "layer 2" in t.columns)["layer 2"]
    assert sim[("B vs A, after alignment", "linear CKA")] == pytest.approx(sim[("B vs A, before alignment",
                                                                                "linear CKA")], abs=1e-6)
    agg = next(t for t in tables if "space" in t.columns and "aggregated relative" in set(t["space"]))
    assert len(agg) >= 3


def test_latent_and_transformer_choices_come_from_and_go_to_the_url(mlps, transformers_src):
    link = {"lat_b": "seed 2", "lat_method": "c2m3", "lat_anchors": "30", "lat_agg": ["seed 0", "seed 2"],
            "tr_a": "seed 2", "tr_b": "seed 0", "tr_method": "activation_matching", "tr_repair": "true",
            "tr_merge": ["seed 1", "seed 2"]}
    at = run_page(PAGE, alignment_models=mlps, alignment_transformers=transformers_src, query=link)
    assert not at.exception, at.exception
    assert at.selectbox(key="lat_b").value == "seed 2" and at.radio(key="lat_method").value == "c2m3"
    assert at.slider(key="lat_anchors").value == 30 and at.multiselect(key="lat_agg").value == ["seed 0", "seed 2"]
    assert at.selectbox(key="tr_a").value == "seed 2" and at.selectbox(key="tr_b").value == "seed 0"
    assert at.radio(key="tr_method").value == "activation_matching" and at.checkbox(key="tr_repair").value
    assert at.multiselect(key="tr_merge").value == ["seed 1", "seed 2"]
    url = url_params(at)
    for key, value in link.items():
        assert url[key] == value, (key, url[key])
    assert url["tr_path_on"] == "false" and url["lat_on"] == "false"
