"""Your own BERT folders + labelled data as the Alignment page's transformer
source (analysis/permutation/own.py): known answers on a model and its exact
permuted copy, saved with save_pretrained (nothing downloads), and the named
errors for bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from tinybert import permuted_bert_pair, write_csv

from analysis.errors import ValidationError
from analysis.ownset import TOKENIZER_FILES
from analysis.permutation.own import open_own_transformers
from analysis.permutation.transformer import evaluate_heads, head_logits
from analysis.permutation.views import (latent_view, pooled_inputs, transformer_layer_fn, transformer_paths,
                                        transformer_setup)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAMS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return permuted_bert_pair(tmp_path_factory.mktemp("own_bert"))


@pytest.fixture(scope="module")
def source(pair):
    return open_own_transformers([pair["a"], pair["b"]], pair["data"])


def test_heads_are_the_checkpoints_classifier_and_score_what_transformers_computes(pair, source):
    from transformers import AutoTokenizer, BertForSequenceClassification
    assert set(source["models"]) == {"seed_a", "seed_b"} and source["task"] == "sentiment"
    assert source["classes"] == ["negative", "positive"] and "classifier on the pooler" in source["heads"]
    assert source["n_heads"] == 4 and source["eps"] == 1e-12
    assert set(source["data"]["sentiment"]) == {"train", "validation", "test"}
    tok = AutoTokenizer.from_pretrained(str(pair["a"]))
    texts = ["the film was really superb", "boring", "it was a very bad movie today"]
    enc = tok(texts, padding=True, return_tensors="pt")
    refs = []
    for name, folder in (("seed_a", pair["a"]), ("seed_b", pair["b"])):
        with torch.no_grad():
            refs.append(BertForSequenceClassification.from_pretrained(str(folder)).eval()(**enc).logits)
        tokens = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
        got = head_logits(source["models"][name], "sentiment", tokens, source["n_heads"], source["eps"])
        torch.testing.assert_close(got, refs[-1], atol=1e-5, rtol=1e-5)
    # the copy, permuted everywhere (pooler outputs and classifier inputs too), computes the same function
    torch.testing.assert_close(refs[1], refs[0], atol=1e-5, rtol=1e-5)
    # the labels are model A's own decisions, so A (and its permuted copy) score 100 % on every split
    for split in ("train", "test"):
        data = {"sentiment": source["data"]["sentiment"][split]}
        for sd in source["models"].values():
            assert evaluate_heads(sd, data, 4, device="cpu")["accuracy"] == 1.0


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_alignment_recovers_the_permutation_of_the_copy(source, method):
    curves, bars = transformer_paths(source, "seed_a", "seed_b", method, False, LAMS)
    bars = bars.set_index(["method", "metric"])
    label = method.replace("_", " ")
    assert abs(bars.loc[(label, "loss"), "path"]) < 1e-5 and abs(bars.loc[(label, "loss"), "midpoint"]) < 1e-5
    acc = curves[(curves.method == label) & (curves.metric == "accuracy")]["value"]
    assert acc.tolist() == [1.0] * len(LAMS)           # identical accuracy all along the aligned path
    assert bars.loc[("naive", "loss"), "path"] > 0.05  # the unaligned copy really has a barrier
    naive = curves[(curves.method == "naive") & (curves.metric == "accuracy")]["value"]
    assert naive.min() < 1.0


def test_latent_view_of_a_model_and_its_permuted_copy(source):
    spec, fam = transformer_setup(source)
    assert "pooler" in spec.groups                      # the classifier reads the pooler: its outputs permute too
    x = pooled_inputs(source, "test", 100)
    sim = latent_view(transformer_layer_fn(source), source["models"], "seed_a", "seed_b", spec, "weight_matching", x,
                      fam).set_index(["comparison", "measure", "layer"])["value"]
    assert set(sim.index.get_level_values("layer")) == {"embeddings", "layer 1", "layer 2", "pooler"}
    for layer in ("embeddings", "layer 1", "layer 2", "pooler"):
        for when in ("before", "after"):
            for measure in ("linear CKA", "relative similarity"):   # permutation-invariant: 1 for a permuted copy
                assert sim[(f"B vs A, {when} alignment", measure, layer)] == pytest.approx(1.0, abs=1e-5)
        assert sim[("B vs A, after alignment", "mean unit correlation", layer)] == pytest.approx(1.0, abs=1e-5)
        assert sim[("B vs A, before alignment", "mean unit correlation", layer)] < 0.5
        assert sim[("weight matching merge vs A", "linear CKA", layer)] == pytest.approx(1.0, abs=1e-5)


def _listing(root):
    return sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in root.rglob("*"))


def test_bertmodel_folders_get_a_linear_probe_per_model(tmp_path):
    pair = permuted_bert_pair(tmp_path, classifier=False)
    before = _listing(tmp_path)
    src = open_own_transformers([pair["a"], pair["b"]], pair["data"])
    assert _listing(tmp_path) == before                  # nothing written into (or beside) the user's folders
    assert "linear probe per model" in src["heads"] and "no linear head" in src["heads"]
    for sd in src["models"].values():
        assert not any(k.startswith("pooler.") for k in sd)   # probes read the mean-pooled states
        assert sd["heads.sentiment.weight"].shape == (2, 16)
    curves, bars = transformer_paths(src, "seed_a", "seed_b", "weight_matching", False, LAMS)
    acc = curves[(curves.method == "weight matching") & (curves.metric == "accuracy")]["value"]
    assert acc.max() - acc.min() < 1e-9                  # B's probe is A's, up to the permutation
    assert abs(bars.set_index(["method", "metric"]).loc[("weight matching", "loss"), "path"]) < 1e-3


def test_a_classifier_with_another_number_of_classes_gets_probes(pair, tmp_path):
    rows = [(f"the film was {w}", c) for w, c in (("good", "pos"), ("bad", "neg"), ("ok", "mixed"))] * 10
    data = write_csv(tmp_path / "three.csv", rows)
    src = open_own_transformers([pair["a"], pair["b"]], data)
    assert "scores 2 classes" in src["heads"] and "has 3" in src["heads"]
    assert src["classes"] == ["mixed", "neg", "pos"] and src["models"]["seed_a"]["heads.three.weight"].shape[0] == 3


def _folder_copy(src, dst, **config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | config))
    return dst


def test_bad_inputs_are_named(pair, tmp_path):
    a, b, data = pair["a"], pair["b"], pair["data"]
    with pytest.raises(ValidationError, match=r"at least two model folders, got 1 \(.*seed_a\)"):
        open_own_transformers([a], data)
    with pytest.raises(ValidationError, match="seed_a: given twice"):
        open_own_transformers([a, a], data)
    missing = tmp_path / "nowhere"
    with pytest.raises(ValidationError, match=f"{missing}: not a Hugging Face model folder"):
        open_own_transformers([a, missing], data)
    roberta = _folder_copy(b, tmp_path / "roberta", model_type="roberta")
    with pytest.raises(ValidationError, match=f"{roberta}: model_type 'roberta' is not a BERT model"):
        open_own_transformers([a, roberta], data)
    wider = _folder_copy(b, tmp_path / "wider", intermediate_size=64)
    with pytest.raises(ValidationError, match=f"{wider}: a different config from {a} \\(intermediate_size: 64 vs 32"):
        open_own_transformers([a, wider], data)
    other_arch = _folder_copy(b, tmp_path / "other_arch", architectures=["BertModel"])
    with pytest.raises(ValidationError, match=f"{other_arch}: a different architecture from {a}"):
        open_own_transformers([a, other_arch], data)
    no_tok = [_folder_copy(p, tmp_path / f"no_tok_{p.name}") for p in (a, b)]
    for p in no_tok:
        for f in TOKENIZER_FILES:
            (p / f).unlink(missing_ok=True)
    with pytest.raises(ValidationError, match="no tokenizer files .* in any of"):
        open_own_transformers(no_tok, data)


def test_bad_data_is_named(pair, tmp_path):
    a, b = pair["a"], pair["b"]
    no_label = write_csv(tmp_path / "texts.csv", [("a good film", None)], labelled=False)
    with pytest.raises(ValidationError, match=f"{no_label}: no 'label' column"):
        open_own_transformers([a, b], no_label)
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("sentence,label\na good film,positive\n")
    with pytest.raises(ValidationError, match=f"{no_text}: no column 'text'"):
        open_own_transformers([a, b], no_text)
    # two classes, as the classifier has, but not its class names: named, never silently replaced by a probe
    wrong = write_csv(tmp_path / "wrong.csv", [("a good film", "good"), ("a bad film", "bad")] * 10)
    with pytest.raises(ValidationError, match=r"wrong.csv, row 2, column 'label': 'good' is not one of the head's "
                                              r"classes \['negative', 'positive'\].*2 outputs"):
        open_own_transformers([a, b], wrong)
    single = write_csv(tmp_path / "single.csv", [("a film", "meh"), ("another film", "meh")] * 10)
    with pytest.raises(ValidationError, match=f"{single}: every row has the label 'meh'"):
        open_own_transformers([a, b], single)
