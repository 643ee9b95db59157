"""Tables, exports and the shareable report.

- `set_summary`: what a loaded task-vector set holds (kinds, per-task norms, per-layer counts).
- `comparison_table`: every configuration tried on the Merge page, with reference
  rows, as absolute / normalised accuracy and NAI (tidy).
- `figure_bytes`: PNG / SVG through kaleido driving a local Chrome/Chromium
  (never downloads one; Debian's /usr/bin/chromium is used when present).
- `html_report`: one self-contained HTML file (plotly.js inline, the tables, and
  the configuration JSON that reproduces them).
- `write_hf_model`: a merged backbone as a Hugging Face folder (config.json,
  sharded safetensors + index in the source dtype, heads.safetensors) that
  `AutoModel.from_pretrained` loads, written whole or not at all;
  `merged_model` streams θ0 + α·δ to it one tensor at a time.
"""
from __future__ import annotations

import datetime as _dt
import errno
import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from analysis.checkpoints import open_checkpoint
from analysis.atomic import atomic_folder, atomic_save_safetensors, atomic_write, atomic_write_json
from analysis.errors import MergescopeError, StorageError, ValidationError
from analysis.merging.scoring import accuracy_by_task, reference_accuracy
from analysis.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_size

Progress = Callable[[float, str], None] | None
DEBIAN_CHROMIUM = "/usr/bin/chromium"
METRIC_TITLES = {"accuracy": "accuracy (%)", "normalized_accuracy": "normalised accuracy (% of fine-tuned)",
                 "normalized_accuracy_improvement": "NAI (% of the gap zero-shot → fine-tuned closed)"}
REFERENCE_LABELS = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned"}


class ExportUnavailable(MergescopeError):
    """A figure cannot be rendered to an image here (no browser for kaleido)."""


# ---------------------------------------------------------------- set summary
def set_summary(tvs, progress: Progress = None) -> dict[str, pd.DataFrame]:
    """Summary tables of a TaskVectorSet; reads every delta once (one tensor at a time).

    Returns {"kinds": kind, tensors, parameters; "tasks": task, l2_norm,
    relative_norm (‖τ‖ / ‖θ0‖), source; "layers": depth, tensors, parameters}.
    """
    names = list(tvs.param_names)
    sq = {t: 0.0 for t in tvs.tasks}
    base_sq = 0.0
    kinds: dict[str, list[int]] = {}
    layers: dict[object, list[int]] = {}
    for i, name in enumerate(names):
        if progress:
            progress(i / max(1, len(names)), f"reading {name} ({i + 1}/{len(names)})")
        numel = math.prod(tvs.shape(name))
        k = kinds.setdefault(tvs.kind(name), [0, 0])
        k[0] += 1
        k[1] += numel
        d = tvs.depth(name)
        lay = layers.setdefault(-1 if d is None else d, [0, 0])
        lay[0] += 1
        lay[1] += numel
        base_sq += float((tvs.base_tensor(name).double() ** 2).sum())
        stacked = tvs.deltas(name)
        for t, task in enumerate(tvs.tasks):
            sq[task] += float((stacked[t].double() ** 2).sum())
    if progress:
        progress(1.0, "done")
    kinds_df = pd.DataFrame([{"kind": k, "tensors": v[0], "parameters": v[1]} for k, v in kinds.items()],
                            columns=["kind", "tensors", "parameters"])
    base_norm = math.sqrt(base_sq)
    tasks_df = pd.DataFrame([{"task": t, "l2_norm": math.sqrt(s),
                              "relative_norm": math.sqrt(s) / base_norm if base_norm > 0 else float("nan"),
                              "source": tvs.sources.get(t, "")} for t, s in sq.items()])
    layers_df = pd.DataFrame([{"depth": "outside blocks" if d == -1 else str(d), "tensors": v[0], "parameters": v[1]}
                              for d, v in sorted(layers.items())], columns=["depth", "tensors", "parameters"])
    return {"kinds": kinds_df, "tasks": tasks_df, "layers": layers_df}


# ---------------------------------------------------------------- configurations
def knobs_text(knobs: Mapping | None) -> str:
    if not knobs:
        return ""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in knobs.items())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _per_task(entry: Mapping) -> dict[str, float]:
    for key in ("per_task", "accuracy", "per_task_accuracy", "accuracies"):
        v = entry.get(key)
        if isinstance(v, Mapping):
            return {str(t): float(a) for t, a in v.items()}
        if isinstance(v, pd.DataFrame):
            return accuracy_by_task(v)
    raise ValidationError(f"a merge_history entry has no per-task accuracy (expected a 'per_task' or 'accuracy' "
                          f"mapping task -> accuracy); its keys are {sorted(entry)}")


def config_label(i: int, entry: Mapping) -> str:
    """'#i method (knobs) [subsample n]': how the i-th history entry is named in tables and figures."""
    knobs = dict(entry.get("knobs") or entry.get("hyperparams") or {})
    label = f"#{i} {entry['method']}" + (f" ({knobs_text(knobs)})" if knobs else "")
    if entry.get("subsample"):
        label += f" [subsample {entry['subsample']}]"  # scored on a subsample, not the whole split
    return label


def history_frame(history: Sequence[Mapping]) -> pd.DataFrame:
    """Tidy: config, method, knobs, split, task, accuracy — one row per task per configuration tried."""
    rows = []
    for i, entry in enumerate(history, start=1):
        if "method" not in entry:
            raise ValidationError(f"merge_history entry {i} has no 'method'; its keys are {sorted(entry)}")
        knobs = dict(entry.get("knobs") or entry.get("hyperparams") or {})
        label = config_label(i, entry)
        for task, acc in _per_task(entry).items():
            rows.append({"config": label, "method": entry["method"], "knobs": json.dumps(knobs, sort_keys=True),
                         "split": entry.get("split", ""), "task": task, "accuracy": acc,
                         "examples": examples_label(entry.get("subsample"))})
    return pd.DataFrame(rows, columns=["config", "method", "knobs", "split", "task", "accuracy", "examples"])


def examples_label(subsample: int | None) -> str:
    """How many examples per task a score was computed on: 'full split' or '<n> per task'."""
    return "full split" if not subsample else f"{int(subsample)} per task"


def _scores():
    """The evaluation helpers when present; the same definitions otherwise."""
    try:
        from analysis.evaluation import normalized_accuracy, normalized_accuracy_improvement
        return normalized_accuracy, normalized_accuracy_improvement
    except ImportError:  # pragma: no cover - the evaluation module ships with the zoo
        return (lambda m, f: m / f), (lambda m, z, f: (m - z) / (f - z))


def comparison_table(history: Sequence[Mapping], reference: pd.DataFrame | Mapping | None = None,
                     split: str | None = None, include_reference: bool = True) -> pd.DataFrame:
    """Tidy: config, method, knobs, split, task, metric, value.

    metric: accuracy; and, when the reference (zero-shot and fine-tuned, same
    split) is known, normalized_accuracy = acc / fine-tuned and
    normalized_accuracy_improvement = (acc − zero-shot) / (fine-tuned − zero-shot).
    Reference rows ("zero-shot", "fine-tuned") are added as configurations.

    `reference` is one table, which every configuration is compared with, or
    {examples per task (None: the full split): table}: each configuration is
    then compared with the references scored on its own examples (its entry's
    "subsample"), and one pair of reference rows is drawn per example count,
    labelled with it when there is more than one. A configuration whose count
    has no table gets accuracy only.
    """
    hist = history_frame(history)
    if split is None:
        split = hist["split"].iloc[0] if len(hist) and hist["split"].iloc[0] else "validation"
    hist = hist[(hist["split"] == split) | (hist["split"] == "")]
    per_count = isinstance(reference, Mapping)
    tables = ({examples_label(n): t for n, t in reference.items() if t is not None and len(t)} if per_count
              else {None: reference} if reference is not None and len(reference) else {})
    refs = {}   # examples label (None: every configuration) -> {model: accuracy by task}
    for examples, table in tables.items():
        r = reference_accuracy(table, split)
        refs[examples] = {model: r[model].dropna() if model in r.columns else pd.Series(dtype=float)
                          for model in ("zero_shot", "fine_tuned")}
    frames = []
    if include_reference:
        for examples, by_model in refs.items():
            for model, acc in by_model.items():
                if len(acc):
                    label = REFERENCE_LABELS[model] + (f" ({examples})" if len(refs) > 1 else "")
                    frames.append(pd.DataFrame({"config": label, "method": model, "knobs": "{}", "split": split,
                                                "task": acc.index, "accuracy": acc.values, "examples": examples}))
    frames.append(hist)
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else hist
    out = [table.assign(metric="accuracy", value=table["accuracy"])]
    na, nai = _scores()
    for config, g in table.groupby("config", sort=False):
        ref = refs.get(g["examples"].iloc[0] if per_count else None, {})
        zs, ft = ref.get("zero_shot"), ref.get("fine_tuned")
        if ft is None or not len(ft):
            continue
        acc = dict(zip(g["task"], g["accuracy"]))
        tasks = [t for t in acc if t in ft.index]
        if not tasks:
            continue
        sub = {t: acc[t] for t in tasks}
        v = _series(na(sub, {t: float(ft[t]) for t in tasks}))
        out.append(g[g["task"].isin(tasks)].assign(metric="normalized_accuracy", value=g["task"].map(v)))
        if zs is not None and all(t in zs.index for t in tasks):
            v = _series(nai(sub, {t: float(zs[t]) for t in tasks}, {t: float(ft[t]) for t in tasks}))
            out.append(g[g["task"].isin(tasks)].assign(metric="normalized_accuracy_improvement",
                                                       value=g["task"].map(v)))
    res = pd.concat(out, ignore_index=True).drop(columns=["accuracy", "examples"])
    return res[["config", "method", "knobs", "split", "task", "metric", "value"]]


def _series(x) -> pd.Series:
    if isinstance(x, pd.DataFrame):
        return x.set_index("task")["value"]
    return pd.Series(x)


def wide_table(comparison: pd.DataFrame, metric: str = "accuracy", tasks: Sequence[str] | None = None,
               percent: bool = False) -> pd.DataFrame:
    """Display form: one row per configuration, one column per task, plus the mean over tasks.

    `percent`: values × 100, as every METRIC_TITLES heading says (the tidy table keeps fractions)."""
    sub = comparison[comparison["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=["config", "method", "knobs", "mean"])
    wide = sub.pivot_table(index=["config", "method", "knobs"], columns="task", values="value", sort=False)
    cols = [t for t in (tasks or []) if t in wide.columns] + [t for t in wide.columns if t not in (tasks or [])]
    wide = wide[cols]
    wide["mean"] = wide.mean(axis=1)
    order = list(dict.fromkeys(sub["config"]))
    wide = wide.reset_index().set_index("config").loc[order].reset_index()
    if percent:
        values = cols + ["mean"]
        wide[values] = wide[values] * 100.0
    return wide


# ---------------------------------------------------------------- images
def find_browser() -> str | None:
    """The Chrome/Chromium kaleido will drive: $BROWSER_PATH, else Debian's chromium, else one on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access(DEBIAN_CHROMIUM, os.X_OK):
        return DEBIAN_CHROMIUM
    for exe in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(exe)
        if found:
            return found
    return None


def export_status() -> tuple[bool, str]:
    """(can figures be exported as PNG/SVG here, a sentence saying why or why not)."""
    missing = []   # every missing piece is named: a machine may lack both (a bare GPU box does)
    try:
        import kaleido  # noqa: F401
    except ImportError:
        missing.append("the 'kaleido' package (pip install 'kaleido>=1'), which is not installed")
    browser = find_browser()
    if browser is None:
        missing.append("a local Chrome or Chromium for kaleido, and none was found (on Debian/Ubuntu: "
                       "apt-get install chromium, or set BROWSER_PATH)")
    if missing:
        return False, f"PNG/SVG export needs {' and '.join(missing)}. The HTML report and CSV tables still work."
    return True, f"figures are rendered by kaleido with {browser}"


def figure_bytes(fig, fmt: str = "png", width: int = 1400, height: int | None = None,
                 scale: float | None = None) -> bytes:
    """Render a plotly figure to PNG or SVG bytes with kaleido and a local browser.

    The figure keeps its own layout (the shared theme: title, legend at the right),
    so the file looks like the app. PNGs default to print resolution
    (`analysis.plots.EXPORT_SCALE` = 3: 4 200 px for the default width, 300 dpi at 14 in)."""
    if fmt not in ("png", "svg"):
        raise ValidationError(f"image format must be 'png' or 'svg', got {fmt!r}")
    ok, why = export_status()
    if not ok:
        raise ExportUnavailable(why)
    os.environ.setdefault("BROWSER_PATH", find_browser())  # kaleido/choreographer read it
    height = height or fig.layout.height or 560
    if scale is None:
        from analysis.plots import EXPORT_SCALE
        scale = EXPORT_SCALE if fmt == "png" else 1.0
    try:
        return fig.to_image(format=fmt, width=width, height=height, scale=scale)
    except Exception as exc:  # kaleido raises several types; the page needs one readable message
        raise ExportUnavailable(f"kaleido could not render the figure as {fmt.upper()} with "
                                f"{os.environ.get('BROWSER_PATH')}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- HTML report
_CSS = """body{font-family:Inter,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0.2em} .meta{color:#666} table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right} th{background:#f4f6fb}
td:first-child,th:first-child{text-align:left} pre{background:#f7f7f7;padding:1em;overflow:auto}"""


def html_report(title: str, figures: Mapping[str, object], tables: Mapping[str, pd.DataFrame],
                config: Mapping, notes: str = "") -> str:
    """A single self-contained HTML page: figures (plotly.js embedded once), tables, configuration JSON."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>generated by mergescope on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>"]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False, "toImageButtonOptions": {"format": "svg"}}))
        first = False
    for name, df in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(df.to_html(index=False, float_format=lambda v: f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}",
                                border=0))
    cfg = json.dumps(config, indent=2, sort_keys=True, default=str)
    parts.append("<h2>Configuration (reproduces the numbers above)</h2>")
    parts.append(f"<pre id='mergescope-config'>{html.escape(cfg)}</pre>")
    safe = cfg.replace("</", "<\\/")  # a JSON string may not close the script element
    parts.append(f"<script type='application/json' id='mergescope-config-json'>{safe}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- merged model
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")
Emit = Callable[[str, torch.Tensor], None]
TensorStream = Callable[[Emit], None]   # calls emit(name, tensor) once per tensor, as each is made


def merged_model(tvs, delta: Mapping[str, torch.Tensor] | None = None, *,
                 merge_into: Callable[[Emit], None] | None = None, alpha: float = 1.0) -> TensorStream:
    """The merged model θ0 + α·δ as a stream for `write_hf_model`, one tensor at a time.

    The merged deltas come from `delta` (a mapping, e.g. a MergeResult) or,
    lazily, from `merge_into(sink)`, which pushes (name, delta) as the merge
    makes them (`analysis.merging.merge(..., sink=sink)`); then no merged
    tensor outlives its shard. Each tensor is computed in float32 (the merge
    arithmetic is float32 throughout) and stored in its base tensor's dtype:
    bf16 in, bf16 out, exactly as `tvs.apply` does. Tensors without a delta
    (buffers, excluded heads) are the base's, unchanged."""
    if (delta is None) == (merge_into is None):
        raise ValidationError("merged_model needs exactly one of `delta` (a mapping) or `merge_into` (a merge "
                              "that pushes its tensors to a sink)")
    params = set(tvs.param_names)

    def produce(emit: Emit) -> None:
        done: set[str] = set()

        def sink(name: str, d: torch.Tensor) -> None:
            if name not in params:
                raise ValidationError(f"delta holds {name!r}, which is not a parameter of this set")
            base = tvs.base.get(name)
            if tuple(d.shape) != tuple(base.shape):
                raise ValidationError(f"the merged delta of {name!r} has shape {tuple(d.shape)}, the base "
                                      f"{tuple(base.shape)}: one merged model needs one delta per parameter "
                                      "(a per-task method gives one per task)")
            emit(name, (base.float() + alpha * d.to("cpu", torch.float32)).to(base.dtype))
            done.add(name)

        if merge_into is not None:
            merge_into(sink)
        else:
            for name, d in delta.items():
                sink(name, d)
        for name in tvs.base.keys():
            if name not in done:
                emit(name, tvs.base.get(name))
    return produce


def write_hf_model(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor] | TensorStream,
                   config_from: str | Path | Mapping, heads: Mapping[str, object] | None = None,
                   metadata: Mapping | None = None, fill_from: Sequence[str | Path] = (),
                   head_usage: str = "logits = mean_pool(last_hidden_state) @ W.T + b", *,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, protect: Sequence[str | Path] = (),
                   also: Callable[[Path], None] | None = None) -> Path:
    """Write a merged backbone as a Hugging Face model folder.

    `state_dict`: {name: tensor}, or a stream (`merged_model`) that emits
    the tensors one at a time; each is written in its own dtype as sharded
    safetensors in the `transformers` layout (`analysis.shards`: at most
    `max_shard_size` per shard, default 5GB; `model.safetensors` alone when
    one shard holds everything), holding at most one shard in memory.
    `config_from`: the base model folder (config.json and tokenizer files are
    copied; its weights are not) or a config dict. `heads`: {task: object with
    .weight, .bias (and optional .labels)} saved to heads.safetensors as
    `<task>.weight` / `<task>.bias` (`head_usage` says how they read the model).
    `metadata` (method, knobs, sources) goes to mergescope.json. `also(folder)`
    may add files (e.g. per-task classifier folders) before the folder is
    published.

    Never written into or over a checkpoint folder: the folder `config_from`
    comes from, those of `fill_from` and of `protect` (the set's sources)
    may neither hold nor be inside the output. The folder is written whole
    (`analysis.atomic.atomic_folder`): it appears complete or not at all, and
    it replaces only an empty folder or an earlier export (one holding
    mergescope.json). A full disk raises `StorageError` naming the file.

    Tensors `transformers.AutoModel` builds for this config but the model
    lacks (the demo's pooler: its backbone was saved without one, and the
    heads read mean-pooled token states, so fine-tuning never changed it) are
    copied unchanged from the first checkpoint of `fill_from` that holds them
    (the MiniLM the demo was built from), so the folder loads without a
    missing-weight warning. mergescope.json lists what was filled from where
    (`filled_from`), anything still missing (`missing_on_load`) and the
    weight files (`weights`).
    """
    out = Path(out_dir).expanduser().resolve()
    limit = parse_size(max_shard_size)
    src_dir = None
    if isinstance(config_from, (str, Path)):
        src = Path(config_from).expanduser().resolve()
        src_dir = src if src.is_dir() else src.parent
        if out == src_dir or src_dir in out.parents:
            raise ValidationError(f"refusing to write the merged model into the base model's folder {src_dir}; "
                                  "choose another output folder")
        if not (src_dir / "config.json").is_file():
            raise ValidationError(f"{src_dir}: no config.json to copy; the base must be a Hugging Face model folder "
                                  "for a loadable export")
    for guarded in [*([src_dir] if src_dir is not None else []), *fill_from, *protect]:
        if not str(guarded) or str(guarded).startswith("<"):
            continue   # an in-memory source ("<base state dict>") has no folder
        g = Path(guarded).expanduser().resolve()
        g_dir = g if g.is_dir() else g.parent
        if out == g_dir or g_dir in out.parents or out in g_dir.parents:
            raise ValidationError(f"refusing to write the merged model to {out}: it is, is inside, or holds the "
                                  f"checkpoint folder {g_dir}; choose an output folder apart from your checkpoints")

    def write(folder: Path) -> None:
        if isinstance(config_from, Mapping):
            atomic_write_json(folder / "config.json", dict(config_from), indent=2)
        else:
            for f in sorted(src_dir.iterdir()):
                if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
                    atomic_write(folder / f.name, lambda tmp, f=f: shutil.copy2(f, tmp))
        writer = ShardWriter(folder, limit)
        if callable(state_dict):
            state_dict(writer.add)
        else:
            for name, t in state_dict.items():
                writer.add(name, t)
        filled, still_missing = _complete_for_auto_model(writer, folder / "config.json", fill_from)
        files = writer.finish()
        if heads:
            head_tensors, labels = {}, {}
            for task, h in heads.items():
                head_tensors[f"{task}.weight"] = h.weight.detach().float().cpu().contiguous()
                head_tensors[f"{task}.bias"] = h.bias.detach().float().cpu().contiguous()
                labels[task] = [str(x) for x in getattr(h, "labels", ())]
            atomic_save_safetensors(head_tensors, folder / "heads.safetensors",
                                    {"labels": json.dumps(labels), "usage": head_usage})
        meta = {**dict(metadata or {}), "weights": files, "total_size": writer.total_size,
                "max_shard_size": limit, "filled_from": filled, "missing_on_load": still_missing}
        atomic_write_json(folder / "mergescope.json", meta, indent=2, default=str)
        if also is not None:
            also(folder)

    try:
        return atomic_folder(out, write, may_replace=lambda folder: (folder / "mergescope.json").is_file())
    except StorageError as exc:
        code = exc.errno or errno.EIO
        why = "no space left on device" if code in (errno.ENOSPC, errno.EDQUOT) else os.strerror(code)
        raise StorageError(code, f"could not write the merged model to {out}: {Path(exc.filename or out).name}: "
                                 f"{why}; {out} is as it was (nothing partial is left)", str(out)) from exc


def _complete_for_auto_model(writer: ShardWriter, config_json: Path,
                             fill_from: Sequence[str | Path]) -> tuple[dict[str, str], list[str]]:
    """Add to `writer` the floating tensors AutoModel(config) expects and it lacks, from `fill_from`
    (names with or without the model's base-model prefix), in the dtype most of the written tensors
    have. Returns ({name: source}, names still missing). A config transformers cannot build is left
    alone (nothing to check)."""
    try:
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained(str(config_json.parent))
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 -- not a transformers architecture: written as given
        return {}, []
    prefix = getattr(type(model), "base_model_prefix", "") or ""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def present(k):
        return k in writer or (prefix and f"{prefix}.{k}" in writer)
    missing = [k for k in expected if not present(k)]
    floating = [d for d in writer.dtypes.values() if d.is_floating_point]
    dtype = max(set(floating), key=floating.count) if floating else torch.float32
    filled: dict[str, str] = {}
    for path in fill_from:
        if not missing:
            break
        src = open_checkpoint(path)
        for k in list(missing):
            name = k if k in src else f"{prefix}.{k}" if prefix and f"{prefix}.{k}" in src else None
            if name is not None and tuple(src.shape(name)) == expected[k]:
                writer.add(k, src.get(name).to(dtype))
                filled[k] = str(src.where(name))
                missing.remove(k)
    return filled, missing
