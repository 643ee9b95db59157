"""Scoring merged deltas: per-task accuracy tables against the references,
and delta statistics when there is no labelled data (a user's own set)."""
from __future__ import annotations

import math
from typing import Callable, Mapping

import pandas as pd
import torch

from analysis.evaluation import ScoringStopped  # noqa: F401  (re-exported: the pages and tests import it here)
from analysis.merging.engine import MergeResult
from analysis.taskvectors import TaskVectorSet

REFERENCE_MODELS = ("zero_shot", "fine_tuned")


def as_result(delta, tasks) -> MergeResult:
    """A MergeResult as is; a plain {param: delta} as the shared model of `tasks`."""
    if isinstance(delta, MergeResult):
        return delta
    return MergeResult("delta", {}, list(tasks), shared=dict(delta))


def merged_accuracy(evaluator, result, split: str = "validation", subsample: int | None = None,
                    stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """{task: accuracy} of base + the delta each task is scored with, for every
    task the evaluator scores (one pooled pass per distinct model: one for a merge,
    one per task for per-task methods such as TSV-C).

    `stop`: polled before every forward batch and every module of its forward
    (`Evaluator.evaluate`); when it returns True, `ScoringStopped` is raised (a background refinement whose
    slider has moved on). It was polled between tasks, so a pass scored one
    task (or four) to stop sooner: one task of 8 examples a pass took twice the
    time of all 8 tasks in one, 0.77 against 0.37 s on the quick demo."""
    result = as_result(result, evaluator.tasks)
    out = {}
    for tasks, delta in result.models():
        scored = [t for t in tasks if t in evaluator.tasks]
        if scored:
            out.update(accuracy_by_task(evaluator.evaluate_delta(delta, split=split, subsample=subsample,
                                                                 tasks=scored, stop=stop)))
    return {t: out[t] for t in result.tasks if t in out}


def reference_on_examples(evaluator, tvs: TaskVectorSet, split: str = "validation", subsample: int | None = None,
                          stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """Zero-shot and fine-tuned references scored on exactly the examples the
    merged model is scored on (`subsample` per task, the evaluator's seeded
    choice), in the reference format: task, model, split, metric, value, n.

    Zero-shot is the base backbone with the task's head (the demo's head is the
    linear probe on pretrained features, so this is its zero-shot protocol);
    fine-tuned is base + that task's own delta."""
    frames = []
    for task in [t for t in tvs.tasks if t in evaluator.tasks]:
        for model, params in (("zero_shot", None), ("fine_tuned", {n: tvs.delta(task, n) for n in tvs.param_names})):
            df = (evaluator.evaluate(None, split=split, subsample=subsample, tasks=[task], stop=stop)
                  if params is None else
                  evaluator.evaluate_delta(params, split=split, subsample=subsample, tasks=[task], stop=stop))
            frames.append(df.assign(model=model))
    if not frames:
        return pd.DataFrame(columns=["task", "model", "split", "metric", "value", "n"])
    return pd.concat(frames, ignore_index=True)[["task", "model", "split", "metric", "value", "n"]]


def accuracy_by_task(table: pd.DataFrame) -> dict[str, float]:
    """{task: accuracy} from a tidy evaluation table (task, metric, value, ...);
    duplicate rows of a task are averaged. The one reader of accuracy rows."""
    acc = table[table["metric"] == "accuracy"] if "metric" in table else table
    return {str(t): float(v) for t, v in acc.groupby("task", sort=False)["value"].mean().items()}


def reference_accuracy(reference: pd.DataFrame | None, split: str) -> pd.DataFrame:
    """task × (zero_shot, fine_tuned) accuracy on `split` (empty when unknown)."""
    if reference is None or not len(reference):
        return pd.DataFrame(columns=list(REFERENCE_MODELS))
    r = reference[(reference["split"] == split) & (reference["metric"] == "accuracy")]
    table = r.pivot_table(index="task", columns="model", values="value", aggfunc="mean", sort=False)
    return table.reindex(columns=[m for m in REFERENCE_MODELS if m in table.columns])


def comparison_table(merged: Mapping[str, float], reference: pd.DataFrame | None, split: str) -> pd.DataFrame:
    """Tidy: task, model (zero_shot | fine_tuned | merged), accuracy, normalized (÷ fine-tuned, NaN if unknown).

    Ends with an "average" task row per model (mean over the tasks)."""
    ref = reference_accuracy(reference, split)
    rows = []
    for task, acc in merged.items():
        ft = float(ref.loc[task, "fine_tuned"]) if task in ref.index and "fine_tuned" in ref.columns else math.nan
        for model in REFERENCE_MODELS:
            if task in ref.index and model in ref.columns and not pd.isna(ref.loc[task, model]):
                value = float(ref.loc[task, model])
                rows.append({"task": task, "model": model, "accuracy": value, "normalized": value / ft if ft else math.nan})
        rows.append({"task": task, "model": "merged", "accuracy": float(acc), "normalized": acc / ft if ft else math.nan})
    df = pd.DataFrame(rows, columns=["task", "model", "accuracy", "normalized"])
    if len(df):
        avg = df.groupby("model", sort=False)[["accuracy", "normalized"]].mean().reset_index()
        avg.insert(0, "task", "average")
        df = pd.concat([df, avg], ignore_index=True)
    return df


def wide(table: pd.DataFrame, column: str = "accuracy") -> pd.DataFrame:
    """task rows × model columns, for display."""
    w = table.pivot_table(index="task", columns="model", values=column, aggfunc="mean", sort=False)
    order = [m for m in (*REFERENCE_MODELS, "merged") if m in w.columns]
    tasks = list(dict.fromkeys(table["task"]))
    return w.reindex(index=tasks, columns=order)


def delta_stats(tvs: TaskVectorSet, result) -> pd.DataFrame:
    """Per parameter: param, kind, depth, merged_norm, sum_norm (‖Σ_t τ_t‖), ratio.

    For per-task results (TSV-C): param, kind, depth, task, norm, relative_error
    (‖recon − τ_t‖ / ‖τ_t‖)."""
    result = as_result(result, tvs.tasks)
    rows = []
    for name in tvs.param_names:
        base = {"param": name, "kind": tvs.kind(name), "depth": tvs.depth(name)}
        if result.per_task:
            for task in tvs.tasks:
                tau = tvs.delta(task, name)
                d = result.for_task(task)[name].detach().to("cpu", torch.float32)
                ref = float(tau.norm())
                rows.append({**base, "task": task, "norm": float(d.norm()),
                             "relative_error": float((d - tau).norm()) / ref if ref else 0.0})
        else:
            d = result[name].detach().to("cpu", torch.float32)
            s = float(tvs.deltas(name).sum(0).norm())
            rows.append({**base, "merged_norm": float(d.norm()), "sum_norm": s,
                         "ratio": float(d.norm()) / s if s else math.nan})
    return pd.DataFrame(rows)
