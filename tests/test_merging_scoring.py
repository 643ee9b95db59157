"""Scoring helpers of the Merge page: comparison tables and delta statistics."""
from __future__ import annotations

import math

import pandas as pd
import torch

from analysis.merging import merge
from analysis.merging.scoring import comparison_table, delta_stats, merged_accuracy, wide
from analysis.plots.merge import accuracy_bars, delta_norms

REF = pd.DataFrame([
    {"task": "a", "model": "zero_shot", "split": "test", "metric": "accuracy", "value": 0.5},
    {"task": "a", "model": "fine_tuned", "split": "test", "metric": "accuracy", "value": 0.8},
    {"task": "b", "model": "zero_shot", "split": "test", "metric": "accuracy", "value": 0.6},
    {"task": "b", "model": "fine_tuned", "split": "test", "metric": "accuracy", "value": 0.9},
    {"task": "a", "model": "fine_tuned", "split": "validation", "metric": "accuracy", "value": 0.1},
])


def test_comparison_table_normalises_by_fine_tuned_and_averages():
    table = comparison_table({"a": 0.4, "b": 0.9}, REF, "test")
    merged = table[table.model == "merged"].set_index("task")
    assert math.isclose(merged.loc["a", "normalized"], 0.5) and math.isclose(merged.loc["b", "normalized"], 1.0)
    assert math.isclose(merged.loc["average", "accuracy"], 0.65)
    assert math.isclose(merged.loc["average", "normalized"], 0.75)
    ft = table[table.model == "fine_tuned"].set_index("task")
    assert math.isclose(ft.loc["a", "accuracy"], 0.8)          # the test split, not validation
    w = wide(table)
    assert list(w.columns) == ["zero_shot", "fine_tuned", "merged"] and list(w.index) == ["a", "b", "average"]
    fig = accuracy_bars(table, normalized=True)
    assert len(fig.data) == 3 and fig.layout.yaxis.title.text.startswith("normalised")


def test_comparison_without_reference_has_only_the_merged_model():
    table = comparison_table({"a": 0.4}, None, "test")
    assert set(table.model) == {"merged"} and table["normalized"].isna().all()


def test_delta_stats_and_per_task_scoring(tiny_workspace):
    tvs, ev = tiny_workspace.tvs, tiny_workspace.evaluator
    ta = merge(tvs, "task_arithmetic", alpha=1.0, device="cpu")
    stats = delta_stats(tvs, ta)
    assert len(stats) == len(tvs.param_names)
    assert ((stats["ratio"] - 1.0).abs() < 1e-5).all()       # α = 1: TA is the sum itself
    assert len(delta_norms(stats).data) == 1
    # TSV-C at f = 1 reconstructs each task: every task scores its own fine-tuned accuracy
    full = merge(tvs, "tsv_c", rank_fraction=1.0, device="cpu")
    errs = delta_stats(tvs, full)
    assert (errs["relative_error"] < 1e-4).all()
    acc = merged_accuracy(ev, full, split="validation")
    ref = tiny_workspace.reference
    ft = ref[(ref.model == "fine_tuned") & (ref.split == "validation") & (ref.metric == "accuracy")]
    for task, value in ft.set_index("task")["value"].items():
        assert math.isclose(acc[task], value, abs_tol=1e-9)
    assert isinstance(merged_accuracy(ev, {k: torch.zeros_like(v) for k, v in ta.items()}), dict)
