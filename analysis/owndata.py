"""Your own data for your own checkpoints: labelled (or unlabelled) text per task.

Formats (documented in the README, "Attaching your own data"):
- a CSV file with a header row and columns `text` and `label` (optional `split`);
- a JSONL file, one object per line with keys `text` and `label` (optional `split`);
- either of them without a `label` column/key: unlabelled text, used for label-free comparisons;
- a folder per task holding `train.*`, `validation.*` (or `val.*` / `dev.*`) and `test.*` files
  (CSV or JSONL, same columns): the splits as given;
- a data folder holding one `<task>.csv` / `<task>.jsonl` file or `<task>/` folder per task
  (`files_in_folder`).

Splits: rows keep the `split` column's value where the file has one (train / validation / test);
otherwise each task is split by `SPLIT_RULE` (stratified 70 / 15 / 15 per class, seeded by the task
name and the split seed, so the same file gives the same split on every machine).

Every error names the file, the row (the line number in the file: a CSV's header is line 1) and
the column at fault.

Uploads from the browser go to `<cache>/uploads/<content hash>/` (`save_upload`), never into a
user's folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from analysis.errors import ValidationError
from analysis.evaluation import SPLITS, canonical_split
from analysis.zoo.data import _task_seed, stratified_split

DATA_SUFFIXES = (".csv", ".jsonl")
FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_RULE = ("Rows with a `split` column keep their split. Otherwise each task's examples are split 70 / 15 / 15 % "
              "into train / validation / test within each label (stratified), shuffled with a seed derived from the "
              "task name and the split seed ({seed}): the same file gives the same split on every machine. "
              "Unlabelled text is not split.")
UPLOAD_LIMIT_MB = 200            # .streamlit/config.toml maxUploadSize: larger checkpoints are given as paths
UNZIP_LIMIT_BYTES = 4 * UPLOAD_LIMIT_MB * 2**20   # a zip may not expand beyond this (zip bombs)


@dataclass
class Examples:
    """One task's rows as read from its file(s).

    `labels` is None for unlabelled text; `splits` holds each row's canonical split where the
    data say it (a `split` column or one file per split), else None. `where[i]` is
    "file, row n" of row i, for error messages."""

    texts: list[str]
    labels: list[str] | None
    splits: list[str] | None
    origin: str
    where: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.texts)


# ---------------------------------------------------------------- reading files
def read_file(path: str | Path) -> Examples:
    """Rows of one CSV or JSONL file (see the module docstring for the columns)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValidationError(f"{path}: no such data file")
    if path.suffix.lower() == ".csv":
        records = _csv_records(path)
    elif path.suffix.lower() == ".jsonl":
        records = _jsonl_records(path)
    else:
        raise ValidationError(f"{path}: data files must be .csv or .jsonl, not {path.suffix or 'without a suffix'!r}")
    if not records:
        raise ValidationError(f"{path}: no rows (a header line and at least one data row are needed)")
    keys = set().union(*(r.keys() for _, r in records))
    col = "column" if path.suffix.lower() == ".csv" else "key"
    if "text" not in keys:
        raise ValidationError(f"{path}: no {col} 'text' (found {sorted(keys)}); each row needs 'text' "
                              "and, for labelled data, 'label'")
    labelled, has_split = "label" in keys, "split" in keys
    texts, labels, splits, where = [], [], [], []
    for line, r in records:
        at = f"{path}, row {line}"
        text = r.get("text")
        if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
            raise ValidationError(f"{at}, {col} 'text': empty; every row needs a text")
        if isinstance(text, (dict, list)):
            raise ValidationError(f"{at}, {col} 'text': expected a string, got {type(text).__name__}")
        texts.append(str(text))
        if labelled:
            label = r.get("label")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise ValidationError(f"{at}, {col} 'label': empty; label every row, or drop the 'label' "
                                      f"{col} for unlabelled text")
            if isinstance(label, (dict, list)) or isinstance(label, float) and not float(label).is_integer():
                raise ValidationError(f"{at}, {col} 'label': {label!r} is not a class name or class index")
            labels.append(str(int(label)) if isinstance(label, (bool, float, int)) and not isinstance(label, bool)
                          else str(label).strip())
        if has_split:
            raw = str(r.get("split") or "").strip()
            try:
                splits.append(canonical_split(raw.lower()))
            except ValidationError:
                raise ValidationError(f"{at}, {col} 'split': {raw!r} is not one of train, validation (val, dev), "
                                      "test") from None
        where.append(at)
    if has_split and not labelled:
        raise ValidationError(f"{path}: has a 'split' {col} but no 'label' {col}; unlabelled text is not split")
    return Examples(texts, labels if labelled else None, splits if has_split else None, str(path), where)


def _csv_records(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{path}: not UTF-8 text ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    header = [h.strip() for h in reader.fieldnames]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ValidationError(f"{path}, row 1: column {dupes[0]!r} appears more than once in the header")
    reader.fieldnames = header
    out = []
    try:
        for r in reader:
            line = reader.line_num
            if None in r:
                raise ValidationError(f"{path}, row {line}: {len(header) + len(r[None])} fields, the header has "
                                      f"{len(header)} ({header}); quote texts that hold commas")
            if all(v is None or not v.strip() for v in r.values()):
                continue  # a blank line
            out.append((line, r))
    except csv.Error as exc:
        raise ValidationError(f"{path}, row {reader.line_num}: not valid CSV ({exc})") from exc
    return out


def _jsonl_records(path: Path) -> list[tuple[int, dict]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{path}: not UTF-8 text ({exc})") from exc
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path}, row {i}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ValidationError(f"{path}, row {i}: expected a JSON object with 'text' and 'label', "
                                  f"got {type(obj).__name__}")
        out.append((i, obj))
    return out


def read_task_data(path: str | Path) -> Examples:
    """One task's data: a CSV/JSONL file, or a folder of train / validation / test files."""
    path = Path(path).expanduser()
    if path.is_file():
        return read_file(path)
    if not path.is_dir():
        raise ValidationError(f"{path}: no such data file or folder")
    parts = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in DATA_SUFFIXES:
            try:
                split = canonical_split(f.stem.lower())
            except ValidationError:
                raise ValidationError(f"{f}: a task folder holds train / validation / test files; "
                                      f"{f.name!r} is none of them") from None
            if split in parts:
                raise ValidationError(f"{path}: two files for the {split!r} split ({parts[split].origin}, {f})")
            parts[split] = read_file(f)
    missing = [s for s in SPLITS if s not in parts]
    if missing:
        raise ValidationError(f"{path}: a task folder needs train, validation and test files (.csv or .jsonl); "
                              f"missing {missing}")
    unlabelled = [p.origin for p in parts.values() if not p.labelled]
    if unlabelled:
        raise ValidationError(f"{unlabelled[0]}: no 'label' column; a task folder's split files must be labelled")
    ex = Examples([], [], [], str(path))
    for split in SPLITS:
        p = parts[split]
        ex.texts += p.texts
        ex.labels += p.labels
        ex.splits += [split] * len(p)
        ex.where += p.where
    return ex


def files_in_folder(folder: str | Path, tasks: Sequence[str]) -> dict[str, Path]:
    """{task: its data file or folder} in a data folder (`<task>.csv`, `<task>.jsonl` or `<task>/`).

    Tasks without data are left out; a name that matches no task is an error (a typo would
    otherwise silently leave a task without data)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValidationError(f"{folder}: no such data folder")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        name = f.stem if f.is_file() else f.name
        if f.name.startswith(".") or (f.is_file() and f.suffix.lower() not in DATA_SUFFIXES):
            continue
        if name not in tasks:
            raise ValidationError(f"{f}: names no task of this set ({list(tasks)}); data files are named "
                                  "after their task: <task>.csv, <task>.jsonl or <task>/")
        if name in found:
            raise ValidationError(f"{folder}: two data sources for task {name!r} ({found[name].name}, {f.name})")
        found[name] = f
    if not found:
        raise ValidationError(f"{folder}: no <task>.csv, <task>.jsonl or <task>/ for any of {list(tasks)}")
    return found


def parse_assignments(text: str, what: str = "data") -> list[tuple[str, str]]:
    """'name = path' per line (blank lines and # comments skipped)."""
    pairs = []
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = (s.strip() for s in line.partition("="))
        if not sep or not name or not value:
            raise ValidationError(f"{what} line {i} {line!r} is not of the form 'task = path'")
        pairs.append((name, value))
    return pairs


def resolve_data(text: str, tasks: Sequence[str]) -> dict[str, Path]:
    """The data form field: lines 'task = path', or a single data folder path (see `files_in_folder`)."""
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    if len(lines) == 1 and "=" not in lines[0]:
        return files_in_folder(lines[0], tasks)
    out = {}
    for task, path in parse_assignments(text):
        if task not in tasks:
            raise ValidationError(f"data line for {task!r}: no task of that name; tasks are {list(tasks)}")
        if task in out:
            raise ValidationError(f"two data lines for task {task!r}")
        out[task] = Path(path).expanduser()
    return out


# ---------------------------------------------------------------- labels and splits
def label_indices(ex: Examples, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(class index per row, class names).

    With `names` (a head's classes, e.g. a checkpoint's id2label): a label is one of the names or
    a class index 0..C-1. Without: the classes are the labels seen, sorted (numerically when
    they are all integers)."""
    if not ex.labelled:
        raise ValidationError(f"{ex.origin}: has no labels")
    if names is None:
        seen = sorted(set(ex.labels))
        if all(_is_int(l) for l in seen):
            seen = sorted(seen, key=int)
        names = seen
    names = [str(n) for n in names]
    index = {n: i for i, n in enumerate(names)}
    y = np.empty(len(ex), dtype=np.int64)
    for i, label in enumerate(ex.labels):
        if label in index:
            y[i] = index[label]
        elif _is_int(label) and 0 <= int(label) < len(names):
            y[i] = int(label)
        else:
            raise ValidationError(f"{ex.where[i]}, column 'label': {label!r} is not one of the head's classes "
                                  f"{names} nor a class index 0..{len(names) - 1}")
    return y, names


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def split_indices(ex: Examples, y: np.ndarray, task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices per split: the data's own splits where given, else `SPLIT_RULE`.

    Every split must be non-empty (train fits probes and data-aware merges, validation
    tunes, test reports)."""
    if ex.splits is not None:
        sp = np.array(ex.splits)
        parts = {s: np.flatnonzero(sp == s) for s in SPLITS}
    else:
        parts = stratified_split(y, _task_seed(task, seed), FRACTIONS)
    empty = [s for s in SPLITS if len(parts[s]) == 0]
    if empty:
        how = "its 'split' column" if ex.splits is not None else f"the 70/15/15 rule on {len(ex)} rows"
        raise ValidationError(f"{ex.origin}: task {task!r} has no {empty[0]} examples after splitting by {how}; "
                              "add rows (at least 7 per label) or a 'split' column")
    return parts


# ---------------------------------------------------------------- uploads
def upload_root(cache: str | Path | None = None) -> Path:
    from analysis.paths import cache_root
    return Path(cache) if cache is not None else cache_root() / "uploads"


def save_upload(name: str, data: bytes, root: str | Path | None = None) -> Path:
    """Keep one uploaded file under `<cache>/uploads/<content hash>/` and return what to load.

    A `.zip` (a zipped Hugging Face folder) is extracted there (paths may not leave the folder;
    at most `UNZIP_LIMIT_BYTES`) and the folder holding its config.json or weights is returned;
    any other file is written as is under its own name. The same bytes uploaded twice land
    in the same place."""
    base = Path(name).name
    if not base or base.startswith("."):
        raise ValidationError(f"upload {name!r}: needs a file name")
    if len(data) > UPLOAD_LIMIT_MB * 2**20:
        raise ValidationError(f"upload {base!r} is {len(data) / 2**20:.0f} MB; uploads are limited to "
                              f"{UPLOAD_LIMIT_MB} MB: give the path of a large checkpoint instead")
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = upload_root(root) / digest
    if base.lower().endswith(".zip"):
        target = folder / Path(base).stem
        if not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)
            _safe_extract(data, target, base)
            (target / ".complete").write_text(base)
        return _model_root(target, base)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / base
    if not path.is_file() or path.stat().st_size != len(data):
        tmp = folder / f".{base}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _safe_extract(data: bytes, target: Path, name: str) -> None:
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ValidationError(f"upload {name!r}: not a readable zip file ({exc})") from exc
    total = 0
    root = target.resolve()
    with z:
        for info in z.infolist():
            dest = (target / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or (dest != root and root not in dest.parents):
                raise ValidationError(f"upload {name!r}: entry {info.filename!r} points outside the folder")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValidationError(f"upload {name!r}: entry {info.filename!r} is a symbolic link")
            total += info.file_size
            if total > UNZIP_LIMIT_BYTES:
                raise ValidationError(f"upload {name!r} expands to more than {UNZIP_LIMIT_BYTES // 2**20} MB")
        target.mkdir(parents=True, exist_ok=True)
        z.extractall(target)


def _model_root(folder: Path, name: str) -> Path:
    """The folder inside an extracted zip that holds the model (config.json or weights)."""
    hits = sorted({p.parent for pattern in ("config.json", "*.safetensors", "pytorch_model.bin",
                                            "adapter_config.json") for p in folder.rglob(pattern)
                   if "__MACOSX" not in p.parts}, key=lambda p: len(p.parts))
    if not hits:
        raise ValidationError(f"upload {name!r}: no config.json, *.safetensors or pytorch_model.bin inside")
    return hits[0]


UPLOAD_SUFFIXES = (".zip", ".safetensors", ".bin", ".pt", ".pth")


def upload_name(name: str | Path) -> str:
    """A task name for an uploaded checkpoint: the uploaded file's name without its checkpoint or zip
    suffix ('sentiment.zip' -> 'sentiment'); judged by the name alone, as the upload is not on disk."""
    base = Path(name).name
    for suffix in UPLOAD_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def describe_split(sizes: Mapping[str, int]) -> str:
    return " / ".join(f"{sizes.get(s, 0)} {s}" for s in SPLITS)
