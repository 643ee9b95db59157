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


def forward_counter(ws) -> list:
    """A list that grows by one per forward batch of the workspace's backbone."""
    calls = []
    ws.evaluator.backbone.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_scoring_polls_its_stop_before_every_forward_batch_with_the_same_numbers(tiny_workspace):
    ws = tiny_workspace
    delta = merge(ws.tvs, "task_arithmetic", alpha=0.5)
    whole = merged_accuracy(ws.evaluator, delta, subsample=40)
    forwards, polls = forward_counter(ws), []
    assert merged_accuracy(ws.evaluator, delta, subsample=40, stop=lambda: polls.append(1) and False) == whole
    assert len(polls) == len(forwards) >= 6             # 3 tasks × 40 examples in batches of at most 16

    def stop_after_one():
        polls.append(1)
        return len(polls) > 1
    polls.clear(), forwards.clear()
    with pytest.raises(ScoringStopped):
        merged_accuracy(ws.evaluator, delta, subsample=40, stop=stop_after_one)
    assert len(forwards) == 1                           # it stopped one batch in, not at the end of a task
    with pytest.raises(ScoringStopped):
        reference_on_examples(ws.evaluator, ws.tvs, subsample=7, stop=lambda: True)