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


def test_scoring_polls_its_stop_inside_every_forward_with_the_same_numbers(tiny_workspace):
    ws = tiny_workspace
    backbone = ws.evaluator.backbone
    delta = merge(ws.tvs, "task_arithmetic", alpha=0.5)
    whole = merged_accuracy(ws.evaluator, delta, subsample=40)
    forwards, polls = forward_counter(ws), []            # forwards: completed ones
    assert merged_accuracy(ws.evaluator, delta, subsample=40, stop=lambda: polls.append(1) and False) == whole
    assert len(forwards) >= 6                            # 3 tasks × 40 examples in batches of at most 16
    assert len(polls) >= 3 * len(forwards)               # before each batch and each module the forward calls

    def stop_on_the_third_poll():                        # before the batch, the backbone, its first module
        polls.append(1)
        return len(polls) >= 3
    polls.clear(), forwards.clear()
    with pytest.raises(ScoringStopped):
        merged_accuracy(ws.evaluator, delta, subsample=40, stop=stop_on_the_third_poll)
    assert len(forwards) == 0 and len(polls) == 3        # it stopped inside the first forward
    assert not any(m._forward_pre_hooks for m in backbone.modules())   # its polling hooks are gone
    assert merged_accuracy(ws.evaluator, delta, subsample=40) == whole  # and the module's own tensors are back
    with pytest.raises(ScoringStopped):
        reference_on_examples(ws.evaluator, ws.tvs, subsample=7, stop=lambda: True)
