"""A user's own tiny BERT set, as `save_pretrained` writes it: a base `BertModel` folder and two
fine-tuned `BertForSequenceClassification` folders (heads `classifier.*`, labels in config.json),
a word-level tokenizer, and a labelled CSV per task. Seconds on a CPU.

    python tests/tinybert.py /tmp/mybert     # writes the folders (for trying the app by hand)
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import torch

WORDS = ["the", "a", "movie", "film", "team", "vote", "today", "really", "was", "it", "and", "very"]
TASKS = {
    "sentiment": {"positive": ["good", "great", "lovely", "superb"], "negative": ["bad", "awful", "boring", "poor"]},
    "topic": {"sports": ["goal", "match", "ball", "coach"], "politics": ["law", "senate", "election", "policy"]},
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocab() -> list[str]:
    words = list(WORDS)
    for classes in TASKS.values():
        for keys in classes.values():
            words += keys
    return SPECIAL + words


def texts_for(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}:{seed}")
    rows = []
    labels = list(TASKS[task])
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(WORDS, k=rng.randint(3, 6)) + [rng.choice(TASKS[task][label])]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, labelled: bool = True) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"] if labelled else ["text"])
        for text, label in rows:
            w.writerow([text, label] if labelled else [text])
    return path


def build(root: Path, n_rows: int = 80, steps: int = 30, seed: int = 0) -> dict:
    """Writes root/{base,sentiment,topic,data}; returns {"base", "tasks": {task: folder}, "data": {task: csv}}."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab()) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    base = BertModel(cfg)
    base.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    out = {"base": root / "base", "tasks": {}, "data": {}}
    (root / "data").mkdir(exist_ok=True)
    for task, classes in TASKS.items():
        labels = list(classes)
        tcfg = BertConfig(**{**cfg.to_dict(), "id2label": dict(enumerate(labels)),
                             "label2id": {l: i for i, l in enumerate(labels)}})
        model = BertForSequenceClassification(tcfg)
        model.bert.load_state_dict(base.state_dict())
        rows = texts_for(task, n_rows, seed)
        enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(l) for _, l in rows])
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            model(**enc, labels=y).loss.backward()
            opt.step()
        model.eval()
        model.save_pretrained(str(root / task))
        out["tasks"][task] = root / task
        out["data"][task] = write_csv(root / "data" / f"{task}.csv", rows)
    return out


if __name__ == "__main__":
    paths = build(Path(sys.argv[1] if len(sys.argv) > 1 else "tinybert"))
    print(f"base = {paths['base']}")
    for t, p in paths["tasks"].items():
        print(f"{t} = {p}    data: {paths['data'][t]}")


def transformers_log(load):
    """(result of load(), what transformers logged meanwhile at warning level and above).

    The level is set here: another test may have silenced transformers (the zoo builder does)."""
    import io
    import logging

    from transformers.utils import logging as hf_logging
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        return load(), buf.getvalue()
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(before)


def permuted_bert_pair(root: Path, n_rows: int = 80, seed: int = 0, classifier: bool = True,
                       heads: int = 4) -> dict:
    """Two folders of one random tiny BERT from "different seeds" whose second is an exact permuted copy of the
    first (a random valid permutation of `bert_spec`: residual stream, FFN, whole heads and units inside heads,
    and the pooler's outputs), plus a CSV of the 'sentiment' texts labelled by the first model's own classifier
    (its bias shifted so that it splits them halfway between the two middle logit margins: both classes
    occur equally, and the model scores 100 %). `classifier=False`: `BertModel` folders
    (with a pooler, no head), labelled the same way. Returns {"a", "b", "data", "perms", "labels"}."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    from analysis.permutation import apply_permutation, random_perms
    from analysis.permutation.transformer import bert_spec
    from transformers.utils import logging
    logging.disable_progress_bar()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab()) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"))
    labels = ["negative", "positive"]
    cfg = BertConfig(vocab_size=len(vocab()), hidden_size=16, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, id2label=dict(enumerate(labels)),
                     label2id={l: i for i, l in enumerate(labels)})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0 and unit-scale weights, so permuting them matters
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if "embeddings" not in name else 1.0))
    rows = texts_for("sentiment", n_rows, seed)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        margin = model(**enc).logits @ torch.tensor([-1.0, 1.0])
    # split halfway between the two middle margins, so no text sits on the decision boundary (a text at
    # margin 0 is classified by float rounding, which differs between transformers and our forward pass)
    middle = margin.sort().values[len(margin) // 2 - 1: len(margin) // 2 + 1]
    assert middle[1] > middle[0], "two texts share the middle margin: pick another seed"
    threshold = middle.mean()
    y = (margin > threshold).long()
    with torch.no_grad():  # the classifier's own decisions are the labels: the model scores 100 % on them
        model.classifier.bias[1] -= threshold
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    spec = bert_spec(sd, heads, extra_inputs=["classifier"])
    perms = random_perms(spec.sizes(sd), seed + 1, spec=spec)
    permuted = apply_permutation(sd, spec, perms)
    copy = BertForSequenceClassification(cfg).eval()
    copy.load_state_dict(permuted, strict=False)
    out = {"a": root / "seed_a", "b": root / "seed_b", "perms": perms, "labels": y}
    for key, m in (("a", model), ("b", copy)):
        if classifier:
            m.save_pretrained(str(out[key]))
        else:
            base = BertModel(BertConfig(**{k: v for k, v in cfg.to_dict().items()
                                           if k not in ("id2label", "label2id", "architectures")}))
            base.load_state_dict(m.bert.state_dict())
            base.save_pretrained(str(out[key]))
        tok.save_pretrained(str(out[key]))
    out["data"] = write_csv(root / "sentiment.csv", [(t, labels[int(c)]) for (t, _), c in zip(rows, y)])
    return out
