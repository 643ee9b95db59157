"""Your own BERT encoders trained from different seeds, with your own labelled
text, as a transformer source for the Alignment views (`views.py`): the same
dict the transformer zoo gives.

    src = open_own_transformers(["/m/seed0", "/m/seed1"], "/data/sst2.csv")
    src["models"], src["n_heads"], src["eps"], src["data"], src["label"], src["heads"]

Models: at least two Hugging Face folders as `save_pretrained` writes them for
`BertModel` or `BertForSequenceClassification` (config.json + weights:
safetensors, sharded or pytorch_model.bin, read by `analysis.checkpoints`), all
with one config: every config.json key equal except bookkeeping ones
(`IGNORED_CONFIG_KEYS`). Only model_type "bert" with absolute positions and
exact GELU: the alignment's forward pass (`transformer.bert_forward`) is that
model's. Parameters keep BertModel's names (a `bert.` prefix is dropped), in
float32.

Data: one CSV / JSONL file, or a folder of train / validation / test files,
read by `analysis.owndata` (columns `text`, `label`, optional `split`); the
task is named after the file. Splits: the data's own, else owndata's seeded
70 / 15 / 15 % per label. Tokens: the folders' own tokenizer (the first folder
holding tokenizer files; every folder that holds one must have the same
vocabulary), at most `max_length` tokens and the model's
max_position_embeddings.

Heads, `heads.<task>.*` (the convention of `transformer.py`):
- the checkpoints' classifier, when every folder has one linear head
  (`classifier.weight` (C, H), `classifier.bias`) on a pooler and every label
  of the data is one of its C classes (a name in config.json's id2label, or an
  index 0..C-1). The pooler is kept, and the heads read its output
  tanh(W h_[CLS] + b), exactly what `BertForSequenceClassification` computes in
  eval mode; alignment permutes the pooler's output units as a group of their
  own (`bert_spec`). A classifier with as many outputs as the data has
  classes whose names the labels do not match is an error, not a silent probe.
- otherwise a linear probe per model: multinomial logistic regression
  (`analysis.zoo.train.train_probe`, C in {0.1, 1, 10, 100} chosen on the
  validation split) fitted on the training split of that model's own
  features, the mean of its last hidden states over the attention mask (as in
  the zoo). The pooler and any other head are then dropped: a BertModel's
  pooler is trained only by next-sentence prediction or by a classifier.

Nothing is written anywhere (not into the folders, not into the cache):
tokenising and fitting probes take seconds, and the page keeps the source in
memory (keyed by `source_stamp`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from analysis.errors import ValidationError
from analysis.permutation.transformer import POOLER, bert_layers, bert_prefix, bert_spec, pack_tokens, pooled

IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                       "_attn_implementation_autoset", "_commit_hash"}
BACKBONE = ("embeddings.", "encoder.", "pooler.")


def _config(folder: Path) -> dict:
    from analysis.ownset import is_hf_folder
    if not is_hf_folder(folder):
        raise ValidationError(f"{folder}: not a Hugging Face model folder (config.json + weights, as "
                              "save_pretrained writes them)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{folder}/config.json: not readable JSON ({exc})") from exc
    kind = cfg.get("model_type")
    if kind != "bert":
        raise ValidationError(f"{folder}: model_type {kind!r} is not a BERT model; aligning your own transformers "
                              "runs BERT's forward pass (model_type 'bert': post-LayerNorm, absolute positions from "
                              "0, GELU), and other families (RoBERTa's offset positions, …) compute differently")
    for key, want in (("position_embedding_type", "absolute"), ("hidden_act", "gelu"), ("is_decoder", False),
                      ("add_cross_attention", False)):
        if cfg.get(key, want) != want:
            raise ValidationError(f"{folder}/config.json: {key} is {cfg[key]!r}; only {want!r} is supported here")
    return cfg


def _same_config(folders: list[Path], configs: list[dict]) -> None:
    first = {k: v for k, v in configs[0].items() if k not in IGNORED_CONFIG_KEYS}
    for folder, cfg in zip(folders[1:], configs[1:]):
        other = {k: v for k, v in cfg.items() if k not in IGNORED_CONFIG_KEYS}
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                what = "architecture" if key == "architectures" else "config"
                raise ValidationError(f"{folder}: a different {what} from {folders[0]} ({key}: {other.get(key)!r} "
                                      f"vs {first.get(key)!r}); models from different seeds share one config")


def _read_model(folder: Path, cfg: dict):
    """(backbone state dict under BertModel names, float32; its linear head on the pooler or None; why not)."""
    from analysis.checkpoints import open_checkpoint
    from analysis.ownset import _linear_head
    src = open_checkpoint(folder)
    floating = [k for k in src.keys() if src.dtype(k).is_floating_point]
    try:
        prefix = bert_prefix(floating)
    except ValidationError as exc:
        raise ValidationError(f"{folder}: not a BERT checkpoint ({exc})") from None
    sd, other = {}, []
    for k in floating:
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is not None and rest.startswith(BACKBONE):
            sd[rest] = src.get(k).float()
        else:
            other.append(k)
    try:
        n_layers = bert_layers(sd, "")
    except ValidationError as exc:
        raise ValidationError(f"{folder}: {exc}") from None
    if n_layers != cfg.get("num_hidden_layers", n_layers):
        raise ValidationError(f"{folder}: the weights hold {n_layers} layers, config.json says "
                              f"num_hidden_layers = {cfg['num_hidden_layers']}")
    has_pooler = f"{POOLER}.weight" in sd
    head, _, why = _linear_head(src, other, int(cfg.get("hidden_size", 0)), has_pooler, folder / "config.json")
    return sd, head, why


def _names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


def _tokenizer(folders: list[Path], tokenizer: str | Path | None):
    from transformers import AutoTokenizer

    from analysis.ownset import TOKENIZER_FILES, _no_progress_bars
    _no_progress_bars()
    if tokenizer is not None:
        candidates = [Path(tokenizer).expanduser()]
    else:
        candidates = [f for f in folders if any((f / n).is_file() for n in TOKENIZER_FILES)]
        if not candidates:
            raise ValidationError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …) in any of "
                                  f"{[str(f) for f in folders]}; save one into a model folder with "
                                  "tokenizer.save_pretrained(folder)")
    loaded = []
    for folder in candidates:
        try:
            loaded.append(AutoTokenizer.from_pretrained(str(folder)))
        except Exception as exc:  # noqa: BLE001 -- damaged or foreign tokenizer files
            raise ValidationError(f"{folder}: its tokenizer cannot be loaded ({type(exc).__name__}: {exc})") from exc
    vocab = loaded[0].get_vocab()
    for folder, tok in zip(candidates[1:], loaded[1:]):
        if tok.get_vocab() != vocab:
            raise ValidationError(f"{folder}: its tokenizer's vocabulary differs from {candidates[0]}'s; models from "
                                  "different seeds of one architecture share one tokenizer")
    return loaded[0], candidates[0]


def _labels(ex, head_labels: list[str] | None) -> tuple[np.ndarray, list[str], str | None]:
    """(class per row, class names, why the checkpoints' classifier is not used (None: it is))."""
    from analysis.owndata import label_indices
    if not ex.labelled:
        raise ValidationError(f"{ex.origin}: no 'label' column; aligning and probing your transformers needs "
                              "labelled text (columns text, label)")
    classes = set(ex.labels)
    if head_labels is not None:
        try:
            y, names = label_indices(ex, head_labels)
            return y, names, None
        except ValidationError as exc:
            if len(classes) == len(head_labels):
                raise ValidationError(f"{exc}. The checkpoints' classifier has {len(head_labels)} outputs and the "
                                      f"data {len(classes)} classes, but the labels do not name them: use its "
                                      "classes (config.json id2label) or indices 0..C-1") from None
            why = (f"the checkpoints' classifier scores {len(head_labels)} classes {head_labels}, the data has "
                   f"{len(classes)}")
    else:
        why = None
    y, names = label_indices(ex)
    if len(names) < 2:
        raise ValidationError(f"{ex.origin}: every row has the label {names[0]!r}; a head needs at least two classes")
    return y, names, why


@torch.no_grad()
def _features(sd, tokens: torch.Tensor, n_heads: int, eps: float, batch_size: int = 128) -> torch.Tensor:
    out = []
    for s in range(0, len(tokens), batch_size):
        tb = tokens[s:s + batch_size]
        out.append(pooled(sd, tb[:, :, :max(int(tb[:, 1].sum(1).max()), 1)], n_heads, eps))
    return torch.cat(out)


def open_own_transformers(folders: Sequence[str | Path], data: str | Path, max_length: int = 128,
                          split_seed: int = 0, tokenizer: str | Path | None = None) -> dict:
    """The transformer source of `views.py` for your own BERT folders and data
    (see the module docstring), plus "heads" (where the heads come from),
    "task", "folders", "tokenizer" (the folder its tokenizer came from) and
    "sizes" (examples per split)."""
    from analysis.evaluation import SPLITS
    from analysis.owndata import read_task_data, split_indices
    from analysis.ownset import encode
    from analysis.zoo.train import train_probe
    paths = [Path(f).expanduser() for f in folders]
    if len(paths) < 2:
        raise ValidationError(f"aligning transformers needs at least two model folders, got {len(paths)}"
                              + (f" ({paths[0]})" if paths else ""))
    seen = set()
    for p in paths:
        if p.resolve() in seen:
            raise ValidationError(f"{p}: given twice; give each model folder once")
        seen.add(p.resolve())
    if int(max_length) < 2:
        raise ValidationError(f"max_length must be at least 2 tokens, got {max_length}")
    configs = [_config(p) for p in paths]
    _same_config(paths, configs)
    cfg = configs[0]
    n_heads, eps = int(cfg.get("num_attention_heads", 12)), float(cfg.get("layer_norm_eps", 1e-12))
    read = [_read_model(p, cfg) for p in paths]
    shapes = {k: tuple(v.shape) for k, v in read[0][0].items()}
    for p, (sd, _, _) in zip(paths[1:], read[1:]):
        other = {k: tuple(v.shape) for k, v in sd.items()}
        if other != shapes:
            diff = sorted(set(shapes) ^ set(other)) or [k for k in shapes if shapes[k] != other[k]]
            raise ValidationError(f"{p}: its weights differ from {paths[0]}'s in {diff[:3]} (same config, "
                                  "different tensors); models from different seeds have the same parameters")
    try:
        bert_spec(read[0][0], n_heads)
    except ValidationError as exc:
        raise ValidationError(f"{paths[0]}: {exc}") from None
    # one config: every folder has the same head, or none has
    lacking = next(((p, why) for p, (_, head, why) in zip(paths, read) if head is None), None)
    head_labels = None if lacking else list(read[0][1].labels)
    ex = read_task_data(data)
    task = Path(data).expanduser().stem
    y, names, why = _labels(ex, head_labels)
    use_classifier = head_labels is not None and why is None
    if lacking:
        why = f"{lacking[0]} has no linear head on a pooler: {lacking[1]}"
    tok, tok_folder = _tokenizer(paths, tokenizer)
    length = min(int(max_length), int(cfg.get("max_position_embeddings", max_length)))
    parts = split_indices(ex, y, task, split_seed)
    splits = {}
    for s in SPLITS:
        enc = encode(tok, [ex.texts[j] for j in parts[s]], length, y[parts[s]])
        top = int(enc.input_ids.max()) if enc.input_ids.numel() else 0
        if top >= int(cfg["vocab_size"]):
            raise ValidationError(f"{tok_folder}: its tokenizer gives token id {top}, the models' vocabulary has "
                                  f"{cfg['vocab_size']} rows; use the tokenizer the models were trained with")
        splits[s] = (pack_tokens(enc.input_ids, enc.attention_mask), enc.labels)
    models, notes = {}, []
    for name, p, (sd, head, _) in zip(_names(paths), paths, read):
        if use_classifier:
            sd = sd | {f"heads.{task}.weight": head.weight, f"heads.{task}.bias": head.bias}
        else:
            sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
            (xtr, ytr), (xva, yva) = splits["train"], splits["validation"]
            probe, info = train_probe(_features(sd, xtr, n_heads, eps), ytr, _features(sd, xva, n_heads, eps), yva,
                                      len(names), names, seed=split_seed)
            sd = sd | {f"heads.{task}.weight": probe.weight, f"heads.{task}.bias": probe.bias}
            notes.append(f"{name}: C = {info['probe_C']}, validation accuracy {info['probe_val_accuracy']:.3f}")
        models[name] = sd
    heads = ("the checkpoints' classifier on the pooler output (as BertForSequenceClassification)" if use_classifier
             else f"a linear probe per model on its mean-pooled last hidden states, fitted on the training split "
                  f"({'; '.join(notes)}); {why}")
    sizes = {s: len(v[1]) for s, v in splits.items()}
    return {"models": models, "n_heads": n_heads, "eps": eps, "data": {task: splits},
            "label": f"your transformers ({len(models)} models, task {task!r}: {sizes['train']} train / "
                     f"{sizes['test']} test examples)",
            "heads": heads, "task": task, "classes": names, "folders": [str(p) for p in paths],
            "tokenizer": str(tok_folder), "sizes": sizes}


def source_stamp(folders: Sequence[str | Path], data: str | Path) -> tuple:
    """Modification times of the folders' files and of the data, so a page's cache re-reads what changed."""
    out = []
    for p in [*folders, data]:
        p = Path(p).expanduser()
        try:
            files = [p] if p.is_file() else [f for f in p.iterdir() if f.is_file()]
            out.append(max((f.stat().st_mtime_ns for f in files), default=0))
        except OSError:
            out.append(None)
    return tuple(out)

