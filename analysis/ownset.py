"""Your own Hugging Face checkpoints as a full workspace: task vectors, a runnable backbone,
per-task heads and, with your data, an Evaluator that works exactly like the demo's.

    own = open_hf_set("/models/base", {"sst2": "/models/sst2", "trec": "/models/trec"})
    own.tvs                  # task vectors over the backbone's own parameter names
    own.heads, own.why_no_head   # heads taken from the checkpoints, or why not
    ev = build_evaluation(own, {"sst2": read_task_data("sst2.csv")}, seed=0)
    ev.evaluator, ev.reference, ev.cards, ev.labelfree

Layout rules (stated in the UI and README):
- base and tasks are Hugging Face folders (config.json + weights) of one architecture that
  `transformers.AutoModel` can build. Parameter names are those of the AutoModel; a
  checkpoint saved from a task model (`bert.encoder…` in a `BertForSequenceClassification`)
  is read through its base-model prefix, so base and tasks may be saved from different classes.
- Tensors of a task checkpoint outside the AutoModel are its head. A head is taken from the
  checkpoint when it is one linear layer (`<name>.weight` (C, H) and `<name>.bias` (C,)) and the
  AutoModel has a pooler: logits = head(pooler_output), exactly what
  `BertForSequenceClassification` computes in eval mode. The set then scores every task on the
  pooler output. Otherwise (no head, a two-layer head such as RoBERTa's, or no pooler) a linear
  probe is fitted: multinomial logistic regression (scikit-learn, C chosen on the validation
  split) on the task's fine-tuned model's features (the pooler output when the set uses it, else
  the mean of the token states over the attention mask, like the demo).
- "zero-shot" reference = the base backbone with the task's head; "fine-tuned" = the task's own
  fine-tuned backbone with it; both on the full validation and test splits.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from analysis.checkpoints import TensorSource, is_lora_adapter, open_checkpoint
from analysis.errors import CheckpointError, ValidationError
from analysis.evaluation import SPLITS, EncodedSplit, Evaluator, Head, features
from analysis.owndata import Examples, describe_split, label_indices, split_indices
from analysis.taskvectors import TaskVectorSet

Progress = Callable[[float, str], None] | None
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "merges.txt")


class RenamedSource(TensorSource):
    """A view of a TensorSource under other names: {new name: name in the source}."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]):
        super().__init__(source.origin)
        self.source = source
        self.names = dict(names)

    def keys(self):
        return list(self.names)

    def shape(self, name):
        return self.source.shape(self.names[name])

    def dtype(self, name):
        return self.source.dtype(self.names[name])

    def where(self, name):
        return self.source.where(self.names[name])

    def _read(self, name):
        return self.source.get(self.names[name])


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json), not a LoRA adapter."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file() and not is_lora_adapter(p)


@dataclass
class OwnSet:
    base: Path
    task_paths: dict[str, Path]
    config: object                      # transformers PretrainedConfig of the base
    prefix: str                         # the AutoModel's base_model_prefix ("bert")
    tvs: TaskVectorSet
    heads: dict[str, Head]              # heads taken from checkpoints
    head_keys: dict[str, tuple[str, str]]  # task -> (weight name, bias name) in its checkpoint
    why_no_head: dict[str, str]         # task -> why a probe is needed instead
    pooling: str                        # "pooler" | "mean"
    tokenizer_folder: Path | None

    @property
    def tasks(self) -> list[str]:
        return self.tvs.tasks

    def backbone(self) -> nn.Module:
        """A fresh AutoModel with the base's weights, returning the pooled features the heads read."""
        from transformers import AutoModel
        _no_progress_bars()
        model = AutoModel.from_config(self.config)
        sd = {k: self.tvs.base.get(k) for k in self.tvs.base.keys()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        floating = {k for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        if set(missing) & floating or unexpected:
            raise CheckpointError(f"{self.base}: the base does not fill the {type(model).__name__}: missing "
                                  f"{sorted(set(missing) & floating)[:3]}, unexpected {sorted(unexpected)[:3]}")
        model = model.float().eval()
        if self.pooling == "pooler":
            _return_pooler_output(model)
        return model

    def tokenizer(self):
        if self.tokenizer_folder is None:
            raise ValidationError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …) in {self.base} or any "
                                  "task folder; save one there with tokenizer.save_pretrained(folder)")
        from transformers import AutoTokenizer
        _no_progress_bars()
        return AutoTokenizer.from_pretrained(str(self.tokenizer_folder))


def _return_pooler_output(model: nn.Module) -> None:
    """The module's forward returns pooler_output (B, H): `features` takes a 2-D output as the pooled features.
    Only the instance's forward changes, so parameter names stay the AutoModel's."""
    forward = model.forward

    def pooled(*args, **kwargs):
        return forward(*args, **kwargs).pooler_output

    model.forward = pooled


def _no_progress_bars() -> None:
    from transformers.utils import logging
    logging.disable_progress_bar()


def _expected(config) -> tuple[dict[str, tuple], str, bool]:
    """({name: shape} of the AutoModel's floating tensors, its base-model prefix, has a pooler)."""
    from transformers import AutoModel
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    return shapes, getattr(type(model), "base_model_prefix", "") or "", getattr(model, "pooler", None) is not None


def _backbone_names(src: TensorSource, expected: Mapping[str, tuple], prefix: str) -> tuple[dict[str, str], list[str]]:
    """({AutoModel name: name in src}, names of src outside the backbone)."""
    names, other = {}, []
    for k in src.keys():
        new = k if k in expected else (k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else None)
        if new is None or new not in expected:
            other.append(k)
        elif new in names:
            raise CheckpointError(f"{src.origin}: holds both {names[new]!r} and {k!r} for the backbone's {new!r}")
        else:
            names[new] = k
    return names, other


def _linear_head(src: TensorSource, other: list[str], hidden: int, has_pooler: bool, config_path: Path
                 ) -> tuple[Head | None, tuple[str, str] | None, str]:
    """The task checkpoint's head when it is one linear layer on the pooler output; else why not."""
    floating = [k for k in other if src.dtype(k).is_floating_point]
    if not floating:
        return None, None, "the checkpoint has no head tensors"
    modules = sorted({k.rsplit(".", 1)[0] for k in floating})
    if len(modules) != 1 or sorted(k.rsplit(".", 1)[-1] for k in floating) != ["bias", "weight"]:
        return None, None, (f"its head ({', '.join(modules[:4])}) is not one linear layer with a bias")
    w, b = f"{modules[0]}.weight", f"{modules[0]}.bias"
    ws, bs = tuple(src.shape(w)), tuple(src.shape(b))
    if len(ws) != 2 or ws[1] != hidden or bs != (ws[0],):
        return None, None, f"its head {modules[0]} has shape {ws}, not (classes, {hidden})"
    if not has_pooler:
        return None, None, "the model has no pooler, and where its head reads the token states is model-specific"
    labels = [str(i) for i in range(ws[0])]
    if config_path.is_file():
        id2label = json.loads(config_path.read_text()).get("id2label") or {}
        if len(id2label) == ws[0]:
            labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(ws[0])]
    return Head(src.get(w).float(), src.get(b).float(), labels), (w, b), ""


def open_hf_set(base: str | Path, tasks: Mapping[str, str | Path], exclude=()) -> OwnSet:
    """Base + {task: fine-tuned folder} of one Hugging Face architecture (see the module docstring);
    `exclude`: regexes of backbone parameters kept at the base's values (never merged)."""
    from transformers import AutoConfig
    _no_progress_bars()
    base = Path(base).expanduser()
    paths = {t: Path(p).expanduser() for t, p in tasks.items()}
    for label, p in [("base", base), *paths.items()]:
        if not is_hf_folder(p):
            raise ValidationError(f"{p} ({label}): running your own models needs Hugging Face folders "
                                  "(config.json + weights, as save_pretrained writes them)")
    try:
        config = AutoConfig.from_pretrained(str(base))
        expected, prefix, has_pooler = _expected(config)
    except Exception as exc:  # an unknown model type, a damaged config
        raise CheckpointError(f"{base}/config.json: transformers cannot build this model ({type(exc).__name__}: "
                              f"{exc})") from exc
    base_src = open_checkpoint(base)
    names, _ = _backbone_names(base_src, expected, prefix)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ValidationError(f"{base}: the base lacks {len(missing)} tensor(s) of its {config.model_type} model, "
                              f"e.g. {missing[:3]}")
    base_view = RenamedSource(base_src, {k: names[k] for k in expected})
    views, heads, head_keys, why = {}, {}, {}, {}
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    for task, path in paths.items():
        src = open_checkpoint(path)
        t_names, other = _backbone_names(src, expected, prefix)
        lacking = sorted(set(expected) - set(t_names))
        if lacking:
            raise ValidationError(f"{path}: task {task!r} lacks {len(lacking)} backbone tensor(s) of the base, "
                                  f"e.g. {lacking[:3]}")
        views[task] = RenamedSource(src, {k: t_names[k] for k in expected})
        head, keys, reason = _linear_head(src, other, hidden, has_pooler, path / "config.json")
        if head is not None:
            heads[task], head_keys[task] = head, keys
        else:
            why[task] = reason
    tvs = TaskVectorSet.from_sources(base_view, views, exclude)
    tok = next((p for p in [base, *paths.values()] if any((p / f).is_file() for f in TOKENIZER_FILES)), None)
    return OwnSet(base, paths, config, prefix, tvs, heads, head_keys, why, "pooler" if heads else "mean", tok)


# ---------------------------------------------------------------- data -> evaluator
@dataclass
class OwnEvaluation:
    evaluator: Evaluator | None
    reference: pd.DataFrame
    cards: dict[str, dict]
    heads: dict[str, Head]               # every labelled task's head (checkpoint or probe)
    labelfree: object | None = None      # analysis.labelfree.TextProbe over the unlabelled tasks
    notes: list[str] = field(default_factory=list)


def encode(tokenizer, texts, max_length: int, labels=None) -> EncodedSplit:
    """Token ids padded to the longest text (at most `max_length` tokens)."""
    from analysis.zoo.train import encode_texts
    ids, mask = encode_texts(tokenizer, list(texts), max_length)
    width = max(int(mask.sum(1).max()) if len(texts) else 1, 1)
    y = torch.zeros(len(texts), dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return EncodedSplit(ids[:, :width].contiguous(), mask[:, :width].contiguous(), y)


@torch.no_grad()
def split_features(backbone: nn.Module, data: EncodedSplit, params: Mapping[str, torch.Tensor] | None,
                   device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Pooled features (N, H) of every example, in data order, with `params` swapped in."""
    order = torch.argsort(data.lengths(), descending=True, stable=True)
    out = []
    for start in range(0, len(data), batch_size):
        b = order[start:start + batch_size]
        inputs, _ = data.batch(b)
        out.append(features(backbone, {k: v.to(device) for k, v in inputs.items()}, params).float().cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)[torch.argsort(order)]


def finetuned_params(tvs: TaskVectorSet, task: str, backbone: nn.Module, device) -> dict[str, torch.Tensor]:
    """base + τ_task, on `device`."""
    base = backbone.state_dict()
    return {n: base[n].to(device).float() + tvs.delta(task, n).to(device) for n in tvs.param_names}


def build_evaluation(own: OwnSet, data: Mapping[str, Examples], seed: int = 0, max_length: int = 128,
                     device=None, progress: Progress = None) -> OwnEvaluation:
    """Evaluator over the labelled tasks, references, and a label-free probe over the unlabelled ones."""
    from analysis.device import get_device
    from analysis.labelfree import TextProbe
    from analysis.zoo.train import train_probe
    report = progress or (lambda f, m: None)
    unknown = [t for t in data if t not in own.tasks]
    if unknown:
        raise ValidationError(f"data given for {unknown[0]!r}, which is not a task of this set ({own.tasks})")
    if not data:  # nothing to run the model on: no backbone to build
        return OwnEvaluation(None, pd.DataFrame(columns=["task", "model", "split", "metric", "value", "n"]), {}, {})
    device = get_device(device)
    tok = own.tokenizer()
    backbone = own.backbone().to(device)
    encoded, heads, cards, unlabelled, notes = {}, {}, {}, {}, []
    for i, (task, ex) in enumerate(data.items()):
        report(0.6 * i / max(1, len(data)), f"{task}: tokenising {len(ex)} rows")
        if not ex.labelled:
            unlabelled[task] = encode(tok, ex.texts, max_length)
            cards[task] = {"task": task, "file": ex.origin, "labelled": False, "texts": len(ex)}
            continue
        head = own.heads.get(task)
        y, names = label_indices(ex, list(head.labels) if head is not None else None)
        parts = split_indices(ex, y, task, seed)
        splits = {s: encode(tok, [ex.texts[j] for j in idx], max_length, y[idx]) for s, idx in parts.items()}
        if head is None:
            report(0.6 * (i + 0.5) / max(1, len(data)), f"{task}: fitting a linear probe on its fine-tuned features")
            params = finetuned_params(own.tvs, task, backbone, device)
            xtr = split_features(backbone, splits["train"], params, device)
            xva = split_features(backbone, splits["validation"], params, device)
            head, info = train_probe(xtr, splits["train"].labels, xva, splits["validation"].labels, len(names),
                                     names, seed=seed)
            source = (f"linear probe on the fine-tuned model's {own.pooling} features (C = {info['probe_C']}, "
                      f"validation accuracy {info['probe_val_accuracy']:.3f}); {own.why_no_head[task]}")
        else:
            source = f"from the checkpoint: {own.head_keys[task][0].rsplit('.', 1)[0]} on the pooler output"
        heads[task] = head
        encoded[task] = splits
        sizes = {s: len(splits[s]) for s in SPLITS}
        cards[task] = {"task": task, "file": ex.origin, "labelled": True, "labels": list(names), "head": source,
                       "sizes": sizes, "split": "as given in the data" if ex.splits is not None else
                       f"seeded 70/15/15 per label (seed {seed})", "summary": describe_split(sizes)}
    evaluator, rows = None, []
    if encoded:
        evaluator = Evaluator(backbone, encoded, heads, device=device)
        for i, task in enumerate(encoded):
            report(0.6 + 0.4 * i / len(encoded), f"{task}: reference accuracy (zero-shot and fine-tuned)")
            tv = own.tvs.task_vector(task)
            for split in ("validation", "test"):
                for model, df in (("zero_shot", evaluator.evaluate(None, split=split, tasks=[task])),
                                  ("fine_tuned", evaluator.evaluate_delta(tv, split=split, tasks=[task]))):
                    rows += [{"task": task, "model": model, "split": split, "metric": r.metric, "value": r.value,
                              "n": r.n} for r in df.itertuples()]
    probe = None
    if unlabelled:
        probe = TextProbe(backbone, unlabelled, own.heads, device=device)
        notes.append(f"unlabelled text for {sorted(unlabelled)}: label-free comparisons on the Merge page")
    report(1.0, "done")
    reference = pd.DataFrame(rows, columns=["task", "model", "split", "metric", "value", "n"])
    return OwnEvaluation(evaluator, reference, cards, heads, probe, notes)


# ---------------------------------------------------------------- export
def write_sequence_classification(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], own: OwnSet,
                                  tasks=None) -> dict[str, Path]:
    """One `AutoModelForSequenceClassification` folder per task whose head came from its checkpoint:
    the merged backbone under the base-model prefix + that head under its own names, the task's
    config.json (labels) and the tokenizer. Returns {task: folder}; tasks whose class would not
    load exactly these tensors are skipped (none for BERT-like models)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    out = Path(out_dir).expanduser()
    written = {}
    for task in (tasks or own.heads):
        if task not in own.heads:
            continue
        cfg_path = own.task_paths[task] / "config.json"
        config = AutoConfig.from_pretrained(str(own.task_paths[task]))
        wk, bk = own.head_keys[task]
        tensors = {f"{own.prefix}.{k}" if own.prefix else k: v.detach().cpu().float().contiguous().clone()
                   for k, v in state_dict.items() if v.dtype.is_floating_point}
        tensors[wk] = own.heads[task].weight.detach().cpu().float().contiguous().clone()
        tensors[bk] = own.heads[task].bias.detach().cpu().float().contiguous().clone()
        try:
            with torch.device("meta"):
                wanted = {k for k, v in AutoModelForSequenceClassification.from_config(config).state_dict().items()
                          if v.dtype.is_floating_point}
        except Exception:  # noqa: BLE001 -- no sequence-classification class for this model type
            continue
        if wanted != set(tensors):
            continue
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cfg_path, folder / "config.json")
        if own.tokenizer_folder is not None:
            for f in own.tokenizer_folder.iterdir():
                if f.name in TOKENIZER_FILES or f.name in ("special_tokens_map.json", "added_tokens.json"):
                    shutil.copy2(f, folder / f.name)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        written[task] = folder
    return written

