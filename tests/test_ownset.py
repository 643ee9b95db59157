"""A user's own tiny BERT (tests/tinybert.py): heads taken from the checkpoints score exactly what
transformers computes, probes are fitted where a checkpoint has no head, the Evaluator serves
data-aware merges, unlabelled text gives label-free comparisons, and the export loads in
transformers without missing-weight warnings."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.errors import ValidationError
from analysis.labelfree import TextProbe, compare_on_text
from analysis.merging import MergeInputs, merge
from analysis.merging.scoring import merged_accuracy
from analysis.owndata import read_task_data
from analysis.ownset import build_evaluation, encode, open_hf_set, write_sequence_classification
from analysis.report import write_hf_model
from tinybert import transformers_log


@pytest.fixture(scope="module")
def own(tiny_bert_dir):
    return open_hf_set(tiny_bert_dir["base"], tiny_bert_dir["tasks"])


@pytest.fixture(scope="module")
def evaluation(own, tiny_bert_dir):
    data = {t: read_task_data(p) for t, p in tiny_bert_dir["data"].items()}
    return build_evaluation(own, data, seed=0, max_length=16, device="cpu")


def test_heads_come_from_the_checkpoints(own, tiny_bert_dir):
    assert own.prefix == "bert" and own.pooling == "pooler" and own.why_no_head == {}
    assert own.tvs.param_names[0] == "embeddings.word_embeddings.weight"    # AutoModel names, prefix read through
    assert "pooler.dense.weight" in own.tvs.param_names
    sd = load_file(str(tiny_bert_dir["tasks"]["topic"] / "model.safetensors"))
    assert torch.equal(own.heads["topic"].weight, sd["classifier.weight"])
    assert own.heads["topic"].labels == ["sports", "politics"]             # config.json id2label
    assert own.head_keys["topic"] == ("classifier.weight", "classifier.bias")


def test_evaluator_scores_what_transformers_computes(own, evaluation, tiny_bert_dir):
    """The fine-tuned backbone + its head through the Evaluator = BertForSequenceClassification's logits."""
    from transformers import AutoModelForSequenceClassification
    ev = evaluation.evaluator
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir["tasks"]["sentiment"]).eval()
    inputs, _, _ = next(ev.batches("sentiment", "test"))
    params = {n: ev.backbone.state_dict()[n] + own.tvs.delta("sentiment", n) for n in own.tvs.param_names}
    with torch.no_grad():
        ours = ev.logits(inputs, "sentiment", params)
        theirs = model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_references_splits_and_merges(own, evaluation):
    ref = evaluation.reference
    acc = ref[(ref.metric == "accuracy") & (ref.split == "test")].pivot(index="task", columns="model", values="value")
    assert (acc["fine_tuned"] >= 0.9).all(), acc      # the keyword tasks are learnt
    assert (acc["zero_shot"] <= 0.75).all(), acc      # the base with a head it never saw: near chance
    card = evaluation.cards["sentiment"]
    assert card["sizes"] == {"train": 56, "validation": 12, "test": 12} and card["split"].startswith("seeded 70/15/15")
    inputs = MergeInputs(own.tvs, evaluation.evaluator, device="cpu", persist=False)
    assert inputs.has_data
    for method, knobs in (("task_arithmetic", {"alpha": 0.5}), ("regmean", {"n_examples": 16})):
        scores = merged_accuracy(evaluation.evaluator, merge(inputs, method, **knobs), split="test")
        assert set(scores) == {"sentiment", "topic"} and all(0.0 <= v <= 1.0 for v in scores.values())


def test_a_checkpoint_without_a_head_gets_a_probe_on_its_fine_tuned_features(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir["tasks"]["topic"])
    m.bert.save_pretrained(tmp_path / "topic_backbone")                   # the backbone alone: no head
    own = open_hf_set(tiny_bert_dir["base"], {"sentiment": tiny_bert_dir["tasks"]["sentiment"],
                                              "topic": tmp_path / "topic_backbone"})
    assert list(own.heads) == ["sentiment"] and own.why_no_head["topic"] == "the checkpoint has no head tensors"
    ev = build_evaluation(own, {t: read_task_data(p) for t, p in tiny_bert_dir["data"].items()}, max_length=16,
                          device="cpu")
    assert ev.cards["topic"]["head"].startswith("linear probe on the fine-tuned model's pooler features")
    ref = ev.reference
    ft = ref[(ref.task == "topic") & (ref.model == "fine_tuned") & (ref.metric == "accuracy")]
    assert (ft["value"] >= 0.9).all(), ft
    assert ev.heads["topic"].labels == ["politics", "sports"]               # the labels seen, sorted


def test_a_two_layer_head_is_not_taken(tiny_bert_dir, tmp_path):
    folder = tmp_path / "two_layer"
    shutil.copytree(tiny_bert_dir["tasks"]["topic"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["pre_classifier.weight"], sd["pre_classifier.bias"] = torch.eye(32), torch.zeros(32)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    own = open_hf_set(tiny_bert_dir["base"], {"topic": folder})
    assert own.heads == {} and own.pooling == "mean"
    assert "(classifier, pre_classifier) is not one linear layer" in own.why_no_head["topic"]


def test_layout_errors_say_what_is_wrong(tiny_bert_dir, tmp_path):
    with pytest.raises(ValidationError, match=r"\(base\): running your own models needs Hugging Face folders"):
        open_hf_set(tmp_path, tiny_bert_dir["tasks"])
    folder = tmp_path / "short"
    shutil.copytree(tiny_bert_dir["tasks"]["topic"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["bert.encoder.layer.1.output.dense.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValidationError, match=r"task 'topic' lacks 1 backbone tensor.*encoder\.layer\.1\.output"):
        open_hf_set(tiny_bert_dir["base"], {"topic": folder})


def test_unlabelled_text_gives_label_free_comparisons(own, tiny_bert_dir, tmp_path):
    import tinybert
    texts = tinybert.write_csv(tmp_path / "topic.csv", tinybert.texts_for("topic", 20, seed=5), labelled=False)
    ev = build_evaluation(own, {"sentiment": read_task_data(tiny_bert_dir["data"]["sentiment"]),
                                "topic": read_task_data(texts)}, max_length=16, device="cpu")
    assert ev.evaluator.tasks == ["sentiment"] and isinstance(ev.labelfree, TextProbe)
    # the merge *is* topic's fine-tuned model: it agrees with it on everything
    table = compare_on_text(ev.labelfree, own.tvs, own.tvs.task_vector("topic")).set_index("task")
    assert table.loc["topic", "prediction_agreement"] == pytest.approx(1.0)
    assert table.loc["topic", "linear_cka"] == pytest.approx(1.0)
    assert table.loc["topic", "mean_cosine"] == pytest.approx(1.0)
    assert table.loc["topic", "text source"] == "its own texts"
    assert table.loc["sentiment", "text source"] == "all unlabelled texts"
    assert table.loc["sentiment", "linear_cka"] < 1.0 - 1e-4                 # a different model: not identical


def test_prediction_agreement_counts_disagreements(own):
    """A head that flips the fine-tuned model's decision on every text: agreement 0."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(own.tokenizer_folder)
    data = encode(tok, ["good movie", "awful film", "the goal", "senate law"], 16)
    backbone = own.backbone()
    probe = TextProbe(backbone, {"topic": data}, {"topic": own.heads["topic"]}, device="cpu")
    flipped = own.heads["topic"]
    probe_flip = TextProbe(backbone, {"topic": data}, {"topic": type(flipped)(-flipped.weight, -flipped.bias)},
                           device="cpu")
    tuned = probe.features(data, probe.params(own.tvs.task_vector("topic")))
    a, b = probe.predictions("topic", tuned), probe_flip.predictions("topic", tuned)
    assert (a != b).all()


def test_export_loads_in_transformers_without_missing_weights(own, evaluation, tmp_path, tiny_bert_dir):
    from transformers import AutoModel, AutoModelForSequenceClassification
    inputs = MergeInputs(own.tvs, evaluation.evaluator, device="cpu", persist=False)
    delta = merge(inputs, "task_arithmetic", alpha=0.5)
    state = own.tvs.apply(delta)
    out = write_hf_model(tmp_path / "merged", state, own.base, heads=evaluation.heads,
                         head_usage="logits = pooler_output @ W.T + b")
    tasks = write_sequence_classification(out / "sequence-classification", state, own)
    assert set(tasks) == {"sentiment", "topic"}
    model, log = transformers_log(lambda: AutoModel.from_pretrained(out))
    assert "MISSING" not in log and "newly initialized" not in log, log
    assert json.loads((out / "mergescope.json").read_text())["missing_on_load"] == []
    clf, log = transformers_log(lambda: AutoModelForSequenceClassification.from_pretrained(tasks["topic"]))
    assert "MISSING" not in log and "UNEXPECTED" not in log, log
    assert clf.config.id2label == {0: "sports", 1: "politics"}
    ev = evaluation.evaluator
    batch, _, _ = next(ev.batches("topic", "test"))
    params = {n: ev.backbone.state_dict()[n] + delta[n] for n in own.tvs.param_names}
    with torch.no_grad():
        assert torch.allclose(clf.eval()(**batch).logits, ev.logits(batch, "topic", params), atol=1e-5)


def test_a_backbone_saved_without_pooler_is_completed_from_its_source(tmp_path):
    """The demo's case: base saved with add_pooling_layer=False, heads on mean-pooled states."""
    from transformers import AutoModel, BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    source = BertModel(cfg)                     # what the demo was built from (MiniLM: has a pooler)
    source.save_pretrained(tmp_path / "source")
    base = BertModel(cfg, add_pooling_layer=False)
    base.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")})
    base.save_pretrained(tmp_path / "base")
    state = base.state_dict()
    bare = write_hf_model(tmp_path / "bare", state, tmp_path / "base")
    _, log = transformers_log(lambda: AutoModel.from_pretrained(bare))
    assert "MISSING" in log                     # the warning the capture must see, when it is there
    assert json.loads((bare / "mergescope.json").read_text())["missing_on_load"] == ["pooler.dense.weight",
                                                                                       "pooler.dense.bias"]
    out = write_hf_model(tmp_path / "merged", state, tmp_path / "base", fill_from=[tmp_path / "source"])
    model, log = transformers_log(lambda: AutoModel.from_pretrained(out))
    assert "MISSING" not in log, log
    assert torch.equal(model.pooler.dense.weight, source.pooler.dense.weight)
    meta = json.loads((out / "mergescope.json").read_text())
    assert set(meta["filled_from"]) == {"pooler.dense.weight", "pooler.dense.bias"} and meta["missing_on_load"] == []


def test_demo_fills_the_pooler_from_minilm():
    from analysis.zoo.demo import Demo
    demo = Demo.__new__(Demo)
    demo.manifest = {"config": {"backbone": "tiny"}}
    assert demo.export_fill == []
    demo.manifest = {"config": {"backbone": "minilm"}}
    from analysis.errors import CheckpointError
    try:
        from analysis.zoo.sources import minilm_folder
        expected = [minilm_folder()]
    except CheckpointError:
        expected = []
    assert demo.export_fill == expected
    if expected:
        from safetensors import safe_open
        with safe_open(str(expected[0] / "model.safetensors"), "pt") as f:
            assert "pooler.dense.weight" in f.keys()
