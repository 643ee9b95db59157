"""Scoring pieces behind the live Merge page: stoppable scoring, and references
scored on the very examples the merged model is scored on."""
import pytest

from analysis.merging import merge
from analysis.merging.scoring import (ScoringStopped, accuracy_by_task, merged_accuracy, reference_accuracy,
                                      reference_on_examples)


def test_references_on_the_full_split_equal_the_workspace_references(tiny_workspace):
    ws = tiny_workspace
    mine = reference_accuracy(reference_on_examples(ws.evaluator, ws.tvs, "test"), "test")
    known = reference_accuracy(ws.reference, "test")
    assert mine.round(6).equals(known.loc[mine.index, mine.columns].round(6))


def test_references_on_a_subsample_score_the_same_examples_as_the_merge(tiny_workspace):
    ws = tiny_workspace
    ref = reference_on_examples(ws.evaluator, ws.tvs, "validation", subsample=5)
    assert set(ref["n"]) == {5}
    # the fine-tuned reference is the merge of one task at weight 1: same examples, same number
    for task in ws.tvs.tasks:
        own = {n: ws.tvs.delta(task, n) for n in ws.tvs.param_names}
        acc = accuracy_by_task(ws.evaluator.evaluate_delta(own, split="validation", subsample=5, tasks=[task]))
        row = ref[(ref.task == task) & (ref.model == "fine_tuned") & (ref.metric == "accuracy")]
        assert float(row["value"].iloc[0]) == pytest.approx(acc[task])


def test_task_by_task_scoring_equals_one_pass_and_stops_when_told(tiny_workspace):
    ws = tiny_workspace
    delta = merge(ws.tvs, "task_arithmetic", alpha=0.5)
    whole = merged_accuracy(ws.evaluator, delta, subsample=7)
    assert merged_accuracy(ws.evaluator, delta, subsample=7, stop=lambda: False) == whole
    calls = []

    def stop_after_one():
        calls.append(1)
        return len(calls) > 1
    with pytest.raises(ScoringStopped):
        merged_accuracy(ws.evaluator, delta, subsample=7, stop=stop_after_one)
    with pytest.raises(ScoringStopped):
        reference_on_examples(ws.evaluator, ws.tvs, subsample=7, stop=lambda: True)
