"""Evaluator contract and normalised scores, on the tiny demo (known answers)."""
import math

import pandas as pd
import pytest
import torch

from analysis.errors import ValidationError
from analysis.evaluation import (EncodedSplit, Evaluator, Head, mean_pool, normalized_accuracy,
                                 normalized_accuracy_improvement)
from analysis.zoo import build_tiny_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_tiny_demo(tmp_path_factory.mktemp("zoo"))


def test_table_is_tidy_and_complete(demo):
    df = demo.evaluator.evaluate(split="test")
    assert list(df.columns) == ["task", "metric", "value", "split", "n"]
    assert set(df["task"]) == set(demo.tasks)
    assert set(df["metric"]) == {"accuracy", "loss"}
    assert (df["split"] == "test").all()
    assert (df["n"] == [demo.evaluator.split_size(t, "test") for t in df["task"]]).all()


def test_pretrained_scores_equal_the_zero_shot_reference(demo):
    df = demo.evaluator.evaluate(split="test")
    acc = df[df.metric == "accuracy"].set_index("task")["value"]
    ref = demo.reference_accuracy("test")
    for task in demo.tasks:
        assert acc[task] == pytest.approx(ref.loc[task, "zero_shot"], abs=1e-9)


def test_fine_tuned_beats_its_probe_on_separable_toy_tasks(demo):
    """Keyword tasks are trivially separable: fine-tuning the backbone under the
    frozen probe head must fit them, while the probe on random features cannot."""
    ev = demo.evaluator
    gains = []
    for task in demo.tasks:
        ft_sd = demo.tvs.apply(demo.tvs.task_vector(task))
        ft = ev.evaluate(ft_sd, split="test", tasks=[task]).query("metric == 'accuracy'")["value"].item()
        zs = ev.evaluate(None, split="test", tasks=[task]).query("metric == 'accuracy'")["value"].item()
        assert ft >= 0.9  # at most one error in 18 on a keyword task
        assert ft >= zs
        gains.append(ft - zs)
    assert sum(g > 0 for g in gains) >= 2 and sum(gains) / len(gains) > 0.05


def test_evaluate_delta_is_base_plus_alpha_delta(demo):
    ev, tvs = demo.evaluator, demo.tvs
    task = tvs.tasks[0]
    tv = tvs.task_vector(task)
    via_delta = ev.evaluate_delta(tv, alpha=1.0, split="validation")
    via_sd = ev.evaluate(tvs.apply(tv, 1.0), split="validation")
    pd.testing.assert_frame_equal(via_delta, via_sd, atol=1e-5, rtol=0)
    zero = ev.evaluate_delta({k: torch.zeros_like(v) for k, v in tv.items()}, split="validation")
    pd.testing.assert_frame_equal(zero, ev.evaluate(None, split="validation"))


def test_subsample_is_fixed_and_sized(demo):
    ev = demo.evaluator
    a = ev.evaluate(split="test", subsample=5)
    b = ev.evaluate(split="test", subsample=5)
    assert (a["n"] == 5).all()
    pd.testing.assert_frame_equal(a, b)
    big = ev.evaluate(split="test", subsample=10**6)
    assert (big["n"] == [ev.split_size(t, "test") for t in big["task"]]).all()


def test_bad_inputs_name_the_fault(demo):
    ev = demo.evaluator
    with pytest.raises(ValidationError, match="no_such"):
        ev.evaluate({"no_such.weight": torch.zeros(1)})
    name = demo.tvs.param_names[0]
    with pytest.raises(ValidationError, match="shape"):
        ev.evaluate({name: torch.zeros(7, 3)})
    with pytest.raises(ValidationError, match="split"):
        ev.evaluate(split="training")
    with pytest.raises(ValidationError, match="nope"):
        ev.evaluate(tasks=["nope"])


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 3.0]]))


def test_heads_come_from_data_order_on_a_hand_built_case():
    """A one-layer identity 'backbone' and a hand-set head: accuracy known exactly."""
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 2)
            with torch.no_grad():
                self.emb.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))

        def forward(self, input_ids, attention_mask):
            return (self.emb(input_ids),)

    ids = torch.tensor([[1, 0], [2, 0], [1, 1], [2, 2], [1, 2]])
    mask = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1], [1, 1]])
    labels = torch.tensor([0, 1, 0, 1, 1])  # last one is a tie -> argmax picks class 0 -> wrong
    data = {"t": {"test": EncodedSplit(ids, mask, labels)}}
    head = Head(torch.eye(2), torch.zeros(2), ["a", "b"])
    ev = Evaluator(Embed(), data, {"t": head}, device="cpu", batch_size=2)
    acc = ev.evaluate(split="test").query("metric == 'accuracy'")["value"].item()
    assert acc == pytest.approx(4 / 5)
    assert list(ev.predictions(task="t", split="test")) == [0, 1, 0, 1, 0]


def test_normalized_scores_known_values():
    assert normalized_accuracy(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert normalized_accuracy_improvement(0.7, 0.5, 0.9) == pytest.approx(0.5)
    merged = {"a": 0.6, "b": 0.9}
    na = normalized_accuracy(merged, {"a": 0.8, "b": 0.9}).set_index("task")["value"]
    assert na["a"] == pytest.approx(0.75) and na["b"] == pytest.approx(1.0)
    table = pd.DataFrame({"task": ["a", "a", "b", "b"], "metric": ["accuracy", "loss"] * 2,
                          "value": [0.6, 9.0, 0.9, 9.0], "split": "test", "n": 10})
    nai = normalized_accuracy_improvement(table, {"a": 0.4, "b": 0.5}, {"a": 0.8, "b": 0.9})
    got = nai.set_index("task")["value"]
    assert got["a"] == pytest.approx(0.5) and got["b"] == pytest.approx(1.0)
    assert set(nai["metric"]) == {"normalized_accuracy_improvement"}
    with pytest.raises(ValidationError):
        normalized_accuracy({"c": 0.5}, {"a": 0.8})
    assert math.isnan(normalized_accuracy_improvement(0.7, 0.5, 0.5))  # undefined when ft == zero-shot


def test_two_threads_scoring_one_evaluator_each_see_their_own_parameters(tiny_workspace):
    """A page and its background refinement (or two sessions sharing a workspace) score the same
    evaluator at once: functional_call swaps tensors into the shared module, so without the
    backbone lock one thread's forward ran with the other's parameters."""
    import threading

    ev, tvs = tiny_workspace.evaluator, tiny_workspace.tvs
    jobs = [None] + [{n: tvs.delta(t, n) for n in tvs.param_names} for t in tvs.tasks]
    want = [ev.evaluate_delta(d) if d is not None else ev.evaluate(None) for d in jobs]
    got: dict[int, list] = {i: [] for i in range(len(jobs))}

    def work(i):
        for _ in range(30):
            got[i].append(ev.evaluate_delta(jobs[i]) if jobs[i] is not None else ev.evaluate(None))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, frames in got.items():
        for df in frames:
            pd.testing.assert_frame_equal(df, want[i])


def test_tasks_scored_together_match_tasks_scored_one_by_one(demo):
    """Several tasks' examples share length-sorted batches (less padding on a CPU); every example still
    gets its own task's head, so each task's table rows are the one-task rows up to float32 rounding."""
    ev = demo.evaluator
    tv = demo.tvs.task_vector(demo.tasks[0])
    for params in (None, demo.tvs.apply(tv, 0.7)):
        for subsample in (None, 5):
            together = ev.evaluate(params, split="validation", subsample=subsample)
            alone = pd.concat([ev.evaluate(params, split="validation", subsample=subsample, tasks=[t])
                               for t in demo.tasks], ignore_index=True)
            pd.testing.assert_frame_equal(together, alone, atol=1e-5, rtol=0)
    assert len(ev._logits_of_tasks(demo.tasks, "validation", None, 5)) == len(demo.tasks)   # the pooled route ran
