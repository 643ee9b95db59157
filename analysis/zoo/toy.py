"""The tiny demo's ingredients: a word-level tokenizer and toy text tasks.

Generated from a seed, so tests get the same data everywhere in milliseconds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from analysis.zoo.data import TaskData, make_task

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
FILLER = ["the", "a", "one", "this", "that", "it", "was", "is", "very", "quite", "and", "then", "we", "they",
          "saw", "had", "with", "from", "today", "again"]
TOY_TASKS = {
    # task: {label: words that mark it}
    "toy_sentiment": {"negative": ["bad", "awful", "poor", "sad"], "positive": ["good", "great", "nice", "happy"]},
    "toy_topic": {"food": ["bread", "soup", "apple", "cheese"], "music": ["guitar", "song", "drum", "piano"],
                  "sport": ["ball", "goal", "match", "team"]},
    "toy_animal": {"bird": ["eagle", "crow", "owl", "duck"], "fish": ["trout", "salmon", "shark", "cod"]},
}


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary, [CLS] ... [SEP] framing."""

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [self.index.get(w, 1) for w in t.lower().split()][: max_length - 2]
            row = [2, *toks, 3]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder, "word_vocab.json").write_text(json.dumps(self.vocab))


def toy_vocab() -> list[str]:
    words = list(FILLER)
    for labels in TOY_TASKS.values():
        for ws in labels.values():
            words += ws
    return SPECIALS + sorted(set(words))


def toy_task(name: str, n: int, seed: int) -> TaskData:
    """Sentences of 5-9 filler words with one or two marker words of the class."""
    rng = np.random.default_rng(seed)
    classes = TOY_TASKS[name]
    labels = list(classes)
    texts, ys = [], []
    for i in range(n):
        label = labels[i % len(labels)]
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 10))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(classes[label])))
        texts.append(" ".join(words))
        ys.append(label)
    card = {"source": "generated (analysis.zoo.toy)", "file": "-", "licence": "generated data, no licence needed",
            "notes": "toy task for tests: the class is marked by one or two keywords"}
    return make_task(name, texts, ys, seed, card=card, label_order=labels)
