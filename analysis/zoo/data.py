"""Task data: texts + labels, deterministic stratified splits, data cards.

Real tasks are read straight from files inside installed wheels
(`analysis.zoo.sources`); the packages' own modules are never imported.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.errors import ValidationError

SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    """One classification task, already split.

    `splits[s]` is (texts, labels) with labels as int indices into
    `label_names`. `card` describes where the data came from.
    """

    name: str
    label_names: list[str]
    splits: dict[str, tuple[list[str], np.ndarray]]
    card: dict = field(default_factory=dict)

    def size(self, split: str) -> int:
        return len(self.splits[split][0])


def stratified_split(labels: Sequence[int], seed: int, fractions=(0.7, 0.15, 0.15),
                     caps: Sequence[int | None] = (None, None, None)) -> dict[str, np.ndarray]:
    """Index arrays per split; each class is shuffled with `seed` and divided by
    `fractions`, so every split keeps the class balance. Caps then keep a
    stratified prefix. Same labels + seed -> same indices, on every machine."""
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValidationError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    out = {}
    for s, cap in zip(SPLITS, caps):
        idx = np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype=int)
        idx = idx[rng.permutation(len(idx))]  # interleave classes
        if cap is not None and len(idx) > cap:
            idx = _stratified_prefix(idx, labels, cap)
        out[s] = np.sort(idx)
    return out


def _stratified_prefix(idx: np.ndarray, labels: np.ndarray, cap: int) -> np.ndarray:
    """`cap` indices out of `idx` keeping each class's share (largest remainders)."""
    classes, counts = np.unique(labels[idx], return_counts=True)
    quota = counts * cap / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: cap - take.sum()]:
        take[i] += 1
    keep = [idx[labels[idx] == c][:k] for c, k in zip(classes, take)]
    return np.concatenate(keep)


def make_task(name: str, texts: Sequence[str], labels: Sequence, seed: int, caps=(None, None, None),
              fractions=(0.7, 0.15, 0.15), card: dict | None = None,
              label_order: Sequence[str] | None = None) -> TaskData:
    """Encode labels, split, and fill the card's sizes and class balance."""
    texts = [str(t) for t in texts]
    labels = [str(l) for l in labels]
    if len(texts) != len(labels):
        raise ValidationError(f"task {name!r}: {len(texts)} texts but {len(labels)} labels")
    names = list(label_order) if label_order else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValidationError(f"task {name!r}: labels {unknown[:3]} are not in {names}")
    if len(names) < 2:
        raise ValidationError(f"task {name!r} needs at least two classes, found {names}")
    y = np.array([names.index(l) for l in labels], dtype=np.int64)
    seed = _task_seed(name, seed)
    parts = stratified_split(y, seed, fractions, caps)
    splits = {s: ([texts[i] for i in idx], y[idx]) for s, idx in parts.items()}
    card = dict(card or {})
    card.update({"task": name, "labels": names, "examples_total": len(texts), "split_seed": seed,
                 "sizes": {s: int(len(idx)) for s, idx in parts.items()},
                 "class_balance": {s: {names[c]: int((y[idx] == c).sum()) for c in range(len(names))}
                                   for s, idx in parts.items()}})
    return TaskData(name, names, splits, card)


def _task_seed(name: str, seed: int) -> int:
    """A per-task seed derived from the build seed (stable across Python runs)."""
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:4], "little")


def cards_table(cards: dict[str, dict]) -> pd.DataFrame:
    """One row per task: source, licence, sizes, class balance (display-ready)."""
    rows = []
    for task, c in cards.items():
        rows.append({"task": task, "source": c.get("source", ""), "file": c.get("file", ""),
                     "licence": c.get("licence", ""), "classes": ", ".join(c.get("labels", [])),
                     "train": c.get("sizes", {}).get("train"), "validation": c.get("sizes", {}).get("validation"),
                     "test": c.get("sizes", {}).get("test"), "total": c.get("examples_total"),
                     "notes": c.get("notes", "")})
    return pd.DataFrame(rows)


def read_user_csv(path: str | Path, seed: int = 0, caps=(None, None, None), name: str | None = None) -> TaskData:
    """A user's own task: a CSV with `text` and `label` columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValidationError(f"{path}: no such CSV file")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise ValidationError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise ValidationError(f"{path}: expected columns 'text' and 'label', missing {missing}; found {list(df.columns)}")
    df = df.dropna(subset=["text", "label"])
    df = df[df["text"].astype(str).str.strip() != ""]
    counts = df["label"].astype(str).value_counts()
    if len(counts) < 2:
        raise ValidationError(f"{path}: a task needs at least two labels, found {list(counts.index)}")
    if counts.min() < 3:
        raise ValidationError(f"{path}: label {counts.idxmin()!r} has {counts.min()} example(s); "
                              "each label needs at least 3 to appear in train, validation and test")
    card = {"source": "user CSV", "file": str(path), "licence": "as provided by the user",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return make_task(name or path.stem, df["text"].tolist(), df["label"].tolist(), seed, caps, card=card)
