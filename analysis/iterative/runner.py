"""The round loop shared by ATM and ColD Fusion, cached and resumable.

One round r = 1..R, from the shared model θ_{r-1} (θ_0 = the evaluator's base):
1. every task t in `config.tasks` fine-tunes a copy of θ_{r-1} for
   `config.steps(t, r)` steps, seed `round_seed(seed, t, r)` -> θ_t;
2. the task vectors τ_t = θ_t − θ_{r-1} are merged by a registry method
   (`config.merge_method`, knobs `config.merge_knobs`) -> δ;
3. θ_r = θ_{r-1} + δ, scored on every task (and, for ColD Fusion, probed and
   briefly fine-tuned on the held-out tasks).
ATM (Zhou et al., 2024) and ColD Fusion (Don-Yehiya et al., ACL 2023) are
this loop with different merges (task arithmetic vs the plain average of the
contributors' models) and different measurements; see `analysis.iterative`.

Cache layout, `<cache>/iterative/<procedure>-<key>/` (key: config + content of
the starting model and data):
    config.json                       the IterativeConfig and the source key
    round_000/metrics.json            the starting model's scores
    round_00r/metrics.json, model.safetensors   θ_r (only the latest round keeps its model)
    run.json                          written last: the run is finished
Each round is written into `.round_00r.tmp/` and renamed into place, so a run
killed at any moment resumes from its last finished round and never reads half
a round; the next round depends only on θ_r and (seed, task, round), so the
resumed run ends where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch
from safetensors.torch import load_file

from analysis.errors import ValidationError
from analysis.evaluation import Evaluator, canonical_split
from analysis.iterative.config import IterativeConfig, round_seed
from analysis.iterative.heldout import heldout_scores
from analysis.iterative.training import finetune_from
from analysis.paths import cache_root
from analysis.taskvectors import TaskVectorSet, atomic_save_safetensors

Progress = Callable[[float, str], None]
COLUMNS = ["procedure", "round", "steps", "task", "metric", "value", "split"]
MEAN, ALL = "mean", "all"     # the `task` of aggregate rows
MODEL_FILE = "model.safetensors"


# ---------------------------------------------------------------- identity
def source_key(evaluator: Evaluator, tasks) -> str:
    """Content hash of what a run starts from: the base backbone, and every split and head of `tasks`."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in evaluator.base_state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for task in sorted(tasks):
        h.update(task.encode())
        for split in sorted(evaluator.data[task]):
            for attr, value in sorted(vars(evaluator.data[task][split]).items()):
                if isinstance(value, torch.Tensor):
                    h.update(f"{split}/{attr}".encode())
                    h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        head = evaluator.heads[task]
        h.update(head.weight.detach().cpu().float().numpy().tobytes() + head.bias.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def run_folder(config: IterativeConfig, source: str, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "iterative" / f"{config.procedure}-{config.key(source)}"


# ---------------------------------------------------------------- results
@dataclass
class IterativeRun:
    """What a run folder holds: its config, the rounds finished so far, whether it is done.

    `table` is tidy (COLUMNS): one row per round, task and metric. Metrics:
    accuracy (per scored task, frozen heads), mean_accuracy (task "mean", over the
    fused tasks), cosine (task "all": mean pairwise cosine of the round's task
    vectors), update_norm (task "all": ‖θ_r − θ_{r-1}‖₂), task_vector_norm (per
    task), heldout_probe_accuracy / heldout_finetune_accuracy (ColD Fusion, per
    held-out task and their "mean"). Round 0 is the starting model.
    `seconds` is the wall time of each round (kept out of the table: it is not a result).
    """

    folder: Path
    config: IterativeConfig
    table: pd.DataFrame
    finished: bool
    seconds: dict[int, float] = field(default_factory=dict)

    @property
    def rounds_done(self) -> int:
        return int(self.table["round"].max()) if len(self.table) else -1

    def metric(self, metric: str) -> pd.DataFrame:
        """round × task of one metric."""
        sub = self.table[self.table["metric"] == metric]
        return sub.pivot_table(index="round", columns="task", values="value", sort=False)

    def final_accuracy(self) -> dict[str, float]:
        """{task: accuracy} of the last finished round's model (every scored task)."""
        last = self.table[(self.table["round"] == self.rounds_done) & (self.table["metric"] == "accuracy")]
        return dict(zip(last["task"], last["value"].astype(float)))

    @property
    def model_path(self) -> Path | None:
        """The latest round's shared model (None before round 1 finishes)."""
        if self.rounds_done < 1:
            return None
        return self.folder / _round_name(self.rounds_done) / MODEL_FILE

    def final_state(self) -> dict[str, torch.Tensor]:
        path = self.model_path
        if path is None:
            raise ValidationError(f"{self.folder}: no round has finished yet, so there is no merged model")
        return load_file(str(path))

    def final_delta(self, tvs: TaskVectorSet) -> dict[str, torch.Tensor]:
        """The final model as a delta on `tvs`' base, over its parameters (for Merge history and export)."""
        if self.model_path is None:
            raise ValidationError(f"{self.folder}: no round has finished yet, so there is no merged model")
        return model_delta(self.model_path, tvs)


def model_delta(path: str | Path, tvs: TaskVectorSet) -> dict[str, torch.Tensor]:
    """A saved backbone (safetensors state dict) as a delta on `tvs`' base, over the set's parameters."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"{path}: the saved model of an iterative run is gone (its cache folder was "
                              "cleared or the run continued); run it again on the Iterative page")
    state = load_file(str(path))
    missing = [n for n in tvs.param_names if n not in state]
    if missing:
        raise ValidationError(f"{path} lacks parameter {missing[0]!r} of the loaded set")
    return {n: state[n].float() - tvs.base_tensor(n).float() for n in tvs.param_names}


def _round_name(r: int) -> str:
    return f"round_{r:03d}"


def load_run(folder: str | Path) -> IterativeRun:
    """Read a run folder as it stands (finished rounds only; what is being written is never read)."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    config = IterativeConfig.from_dict(meta["config"])
    rows, seconds = [], {}
    for d in sorted(folder.glob("round_[0-9][0-9][0-9]")):
        m = json.loads((d / "metrics.json").read_text())
        rows += m["rows"]
        seconds[int(m["round"])] = float(m["seconds"])
    table = pd.DataFrame(rows, columns=COLUMNS)
    return IterativeRun(folder, config, table, (folder / "run.json").is_file(), seconds)


# ---------------------------------------------------------------- checks
def check(config: IterativeConfig, evaluator: Evaluator) -> None:
    """Everything that can be wrong before a step is taken, each with the value at fault."""
    from analysis.merging import get_method
    known = evaluator.tasks
    for task in config.tasks + config.heldout:
        if task not in known:
            raise ValidationError(f"no task named {task!r}; the evaluator has {known}")
        if "train" not in evaluator.data[task]:
            raise ValidationError(f"task {task!r} has no 'train' split to fine-tune on")
    canonical_split(config.eval_split)
    for task in config.heldout:
        missing = [s for s in ("train", "validation", config.eval_split) if s not in evaluator.data[task]]
        if missing:
            raise ValidationError(f"held-out task {task!r} needs the split(s) {missing} for its probe")
    spec = get_method(config.merge_method)
    if spec.per_task:
        raise ValidationError(f"{config.merge_method} gives each task its own model; an iterative run needs one "
                              "merged model per round")
    why = spec.unavailable(len(config.tasks), has_data=True)
    if why:
        raise ValidationError(f"{config.merge_method} {why}")
    spec.validate(config.knobs, len(config.tasks))


# ---------------------------------------------------------------- one round's numbers
def _state_of(evaluator: Evaluator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in evaluator.base_state_dict().items()}


def _merge(config: IterativeConfig, evaluator: Evaluator, shared: Mapping, finetuned: Mapping):
    """(task-vector set of the round, merged delta {name: CPU tensor})."""
    from analysis.merging import METHODS, MergeInputs, merge
    tvs = TaskVectorSet.from_state_dicts(shared, finetuned)
    spec = METHODS[config.merge_method]
    needs_data = spec.needs.labelled_data or spec.needs.activations or spec.needs.gradients
    inputs = MergeInputs(tvs, evaluator if needs_data else None, device=evaluator.device, persist=False)
    result = merge(inputs, config.merge_method, **config.knobs)
    return tvs, {n: result[n].detach().to("cpu", torch.float32) for n in tvs.param_names}


def _geometry(tvs: TaskVectorSet, delta: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Mean pairwise cosine of the task vectors, their norms, and the update's norm (float64 sums)."""
    T = len(tvs.tasks)
    gram = torch.zeros(T, T, dtype=torch.float64)
    update = 0.0
    for n in tvs.param_names:
        d = tvs.deltas(n).reshape(T, -1).to("cpu", torch.float64)
        gram += d @ d.T
        update += float(delta[n].double().pow(2).sum())
    norms = gram.diagonal().sqrt()
    cos = [float(gram[i, j] / (norms[i] * norms[j])) for i in range(T) for j in range(i + 1, T)
           if norms[i] > 0 and norms[j] > 0]
    return {"cosine": sum(cos) / len(cos) if cos else float("nan"), "update_norm": update ** 0.5,
            "task_vector_norm": {t: float(norms[i]) for i, t in enumerate(tvs.tasks)}}


def _score_rows(config: IterativeConfig, evaluator: Evaluator, state: Mapping, r: int, progress) -> list[dict]:
    """Accuracy rows of model `state` (+ held-out rows for ColD Fusion)."""
    from analysis.merging.scoring import accuracy_by_task
    split = canonical_split(config.eval_split)
    nominal = config.steps_done("", r) if r else 0

    def row(task, metric, value, steps=nominal):
        return {"procedure": config.procedure, "round": r, "steps": steps, "task": task, "metric": metric,
                "value": float(value), "split": split}

    scored = list(config.tasks) + list(config.heldout)
    acc = accuracy_by_task(evaluator.evaluate(dict(state), split=split, subsample=config.eval_subsample, tasks=scored))
    rows = [row(t, "accuracy", acc[t], config.steps_done(t, r) if t in config.tasks else 0) for t in scored]
    rows.append(row(MEAN, "mean_accuracy", sum(acc[t] for t in config.tasks) / len(config.tasks)))
    held: dict[str, list[float]] = {}
    for i, task in enumerate(config.heldout):
        progress(f"round {r}: held-out task {task} ({i + 1}/{len(config.heldout)})")
        for metric, value in heldout_scores(evaluator, state, task, config).items():
            rows.append(row(task, metric, value, 0))
            held.setdefault(metric, []).append(value)
    for metric, values in held.items():
        rows.append(row(MEAN, metric, sum(values) / len(values), 0))
    return rows


# ---------------------------------------------------------------- the loop
@contextlib.contextmanager
def _lock(path: Path):
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_round(folder: Path, r: int, rows: list[dict], seconds: float, state: Mapping | None) -> None:
    final = folder / _round_name(r)
    tmp = folder / f".{_round_name(r)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if state is not None:
        atomic_save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp / MODEL_FILE)
    (tmp / "metrics.json").write_text(json.dumps({"round": r, "seconds": round(seconds, 3), "rows": rows}, indent=1))
    os.replace(tmp, final)
    if r > 1:  # the previous model is no longer needed to resume; keep its numbers
        (folder / _round_name(r - 1) / MODEL_FILE).unlink(missing_ok=True)


def run(config: IterativeConfig, evaluator: Evaluator, cache_dir: str | Path | None = None,
        progress: Progress | None = None, source: str | None = None) -> IterativeRun:
    """Run (or resume, or find) `config` starting from `evaluator`'s base backbone.

    `source`: the content key of the starting model and data (`source_key`),
    when the caller already has it. `progress(fraction, message)` as rounds advance.
    """
    check(config, evaluator)
    report = progress or (lambda f, m: None)
    source = source or source_key(evaluator, config.tasks + config.heldout)
    folder = run_folder(config, source, cache_dir)
    if (folder / "run.json").is_file():
        report(1.0, f"already finished: {folder}")
        return load_run(folder)
    with _lock(folder.with_name(f".{folder.name}.lock")):
        return _run_locked(config, evaluator, folder, source, report)


def _run_locked(config, evaluator, folder: Path, source: str, report: Progress) -> IterativeRun:
    if (folder / "run.json").is_file():
        return load_run(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".round_*.tmp"):   # a round cut short: start it again
        shutil.rmtree(tmp, ignore_errors=True)
    cfg_text = json.dumps({"config": config.to_dict(), "source": source}, indent=1, default=str)
    if not (folder / "config.json").is_file():
        tmp = folder / ".config.json.tmp"
        tmp.write_text(cfg_text)
        os.replace(tmp, folder / "config.json")
    done = load_run(folder).rounds_done
    units_per_round = len(config.tasks) + 1 + len(config.heldout)
    total = (config.rounds + 1) * units_per_round

    def at(r: int, unit: int, message: str) -> None:
        report(min(1.0, (r * units_per_round + unit) / total), message)

    if done < 0:
        t0 = time.time()
        state = _state_of(evaluator)
        at(0, 0, "round 0: scoring the starting model")
        rows = _score_rows(config, evaluator, state, 0, lambda m: at(0, 1, m))
        _write_round(folder, 0, rows, time.time() - t0, None)
        done = 0
    if done == 0:
        shared = _state_of(evaluator)
    else:
        shared = {**_state_of(evaluator), **load_file(str(folder / _round_name(done) / MODEL_FILE))}
    for r in range(done + 1, config.rounds + 1):
        t0 = time.time()
        finetuned = {}
        for i, task in enumerate(config.tasks):
            steps = config.steps(task, r)
            at(r, i, f"round {r}/{config.rounds}: fine-tuning {task} ({steps} steps)")
            finetuned[task] = finetune_from(evaluator, shared, task, steps, config, round_seed(config.seed, task, r))
        at(r, len(config.tasks), f"round {r}/{config.rounds}: merging ({config.merge_method}) and scoring")
        tvs, delta = _merge(config, evaluator, shared, finetuned)
        geo = _geometry(tvs, delta)
        del finetuned
        shared = tvs.apply(delta)
        rows = _score_rows(config, evaluator, shared, r, lambda m: at(r, len(config.tasks) + 1, m))
        nominal = config.steps_done("", r)
        base = {"procedure": config.procedure, "round": r, "split": canonical_split(config.eval_split)}
        rows += [{**base, "steps": nominal, "task": ALL, "metric": "cosine", "value": geo["cosine"]},
                 {**base, "steps": nominal, "task": ALL, "metric": "update_norm", "value": geo["update_norm"]}]
        rows += [{**base, "steps": config.steps_done(t, r), "task": t, "metric": "task_vector_norm", "value": v}
                 for t, v in geo["task_vector_norm"].items()]
        _write_round(folder, r, rows, time.time() - t0, shared)
        mean = next(x["value"] for x in rows if x["metric"] == "mean_accuracy")
        at(r + 1, 0, f"round {r}/{config.rounds} done: mean accuracy {mean:.4f}, cosine {geo['cosine']:.3f}")
    result = load_run(folder)
    tmp = folder / ".run.json.tmp"
    tmp.write_text(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "rounds": config.rounds, "seconds": result.seconds,
                               "final_accuracy": result.final_accuracy()}, indent=1))
    os.replace(tmp, folder / "run.json")
    report(1.0, f"finished: {folder}")
    return load_run(folder)
