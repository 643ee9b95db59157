"""The merge engine's contract, for every registered method through the same engine.

A method added to the registry is picked up here without touching this file:
it must run on the tiny workspace (real Evaluator, real nn.Module backbone),
return one well-formed model per task, be scored, and answer the one
availability check consistently.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.errors import HyperparameterError, ValidationError
from analysis.evaluation import Evaluator, FeatureSplit, Head
from analysis.merging import METHODS, MergeInputs, MergeMethod, MergeResult, available_methods, merge, unavailable
from analysis.merging.scoring import delta_stats, merged_accuracy
from analysis.taskvectors import TaskVectorSet


@pytest.fixture
def inputs(tiny_workspace, tmp_path):
    return MergeInputs(tiny_workspace.tvs, tiny_workspace.evaluator, device="cpu", cache_dir=tmp_path)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_through_the_engine(name, inputs, tiny_workspace):
    method = METHODS[name]
    tvs = inputs.tvs
    n_tasks = len(tvs.tasks)
    why = unavailable(name, n_tasks, has_data=True)
    if why:   # e.g. slerp on three tasks: the check says why, and merge refuses with the same reason
        assert method.needs.max_tasks is not None and method.needs.max_tasks < n_tasks
        with pytest.raises(HyperparameterError, match=name):
            merge(inputs, name)
        two = MergeInputs(tvs.subset(tvs.tasks[:2]), tiny_workspace.evaluator, device="cpu")
        inputs, tvs = two, two.tvs
    result = merge(inputs, name)
    assert isinstance(result, MergeResult) and result.method == name and result.per_task == method.per_task
    assert result.params == method.defaults(len(tvs.tasks))
    for task in tvs.tasks:
        delta = result.for_task(task)
        assert list(delta) == tvs.param_names
        for p, d in delta.items():
            assert tuple(d.shape) == tvs.shape(p) and d.dtype == torch.float32 and torch.isfinite(d).all(), (name, p)
    tasks_served = sorted(t for tasks, _ in result.models() for t in tasks)
    assert tasks_served == sorted(tvs.tasks)
    acc = merged_accuracy(tiny_workspace.evaluator, result, split="validation")
    assert set(acc) == set(tvs.tasks) and all(0.0 <= a <= 1.0 for a in acc.values())
    assert len(delta_stats(tvs, result))


def knob_extremes(hp, n_tasks: int) -> list:
    """The values a knob's declaration promises to accept at its edges."""
    if hp.type in ("float", "int"):
        return [hp.low, hp.high_for(n_tasks)]
    if hp.type == "bool":
        return [False, True]
    return list(hp.choices)


def knob_just_outside(hp, n_tasks: int) -> list:
    if hp.type in ("float", "int"):
        step = hp.step or 1
        return [hp.low - step, hp.high_for(n_tasks) + step]
    return ["no-such-value"]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_knob_runs_at_its_declared_extremes_and_is_refused_past_them(name, inputs, tiny_workspace):
    """Each knob at its low and high end (every choice, both booleans), the
    others at their defaults, merges to finite tensors; one step past either
    end raises HyperparameterError naming the knob, before anything runs."""
    method = METHODS[name]
    if unavailable(name, len(inputs.tasks), has_data=True):
        inputs = MergeInputs(inputs.tvs.subset(inputs.tasks[:2]), tiny_workspace.evaluator, device="cpu")
    for hp in method.hyperparameters:
        for value in knob_extremes(hp, len(inputs.tasks)):
            result = merge(inputs, name, **{hp.name: value})
            for task in inputs.tasks:
                assert all(torch.isfinite(d).all() for d in result.for_task(task).values()), (name, hp.name, value)
        for value in knob_just_outside(hp, len(inputs.tasks)):
            with pytest.raises(HyperparameterError, match=rf"'{hp.name}'"):
                merge(inputs, name, **{hp.name: value})


def test_the_availability_check_follows_the_declared_needs():
    for name, method in METHODS.items():
        needs = method.needs
        data_aware = needs.labelled_data or needs.activations or needs.gradients
        assert (unavailable(name, 3, has_data=False) is None) == (not data_aware and needs.max_tasks in (None, 3, 4))
        if data_aware:
            assert "labelled data" in unavailable(name, 3, has_data=False)
    assert set(available_methods(3, has_data=True)) >= {"fisher", "regmean", "regmean_pp", "epimer"}
    assert not {"fisher", "regmean", "regmean_pp", "epimer"} & set(available_methods(3, has_data=False))


@pytest.mark.parametrize("name", [n for n, m in METHODS.items()
                                  if m.needs.labelled_data or m.needs.activations or m.needs.gradients])
def test_data_aware_methods_without_data_say_so(name, tiny_workspace):
    with pytest.raises(ValidationError, match=rf"{name}.*labelled data|labelled data.*"):
        merge(MergeInputs(tiny_workspace.tvs, None, device="cpu"), name)


def test_statistics_are_cached_by_content(tiny_workspace, tmp_path):
    ev = tiny_workspace.evaluator
    first = MergeInputs(tiny_workspace.tvs, ev, device="cpu", cache_dir=tmp_path)
    merge(first, "fisher", n_examples=32)
    merge(first, "regmean", n_examples=32)
    assert first.stats_compute_count == 2 * len(first.tasks)           # Fishers + Grams, once per task
    merge(first, "fisher", n_examples=32, alpha=2.0)
    merge(first, "regmean", n_examples=32, off_diagonal=0.5)
    merge(first, "epimer", n_examples=32)                              # reuses the same Fishers
    assert first.stats_compute_count == 2 * len(first.tasks)
    # a new process (new object) with the same content reads the disk cache
    again = MergeInputs(tiny_workspace.tvs, ev, device="cpu", cache_dir=tmp_path)
    merge(again, "fisher", n_examples=32)
    assert again.stats_compute_count == 0
    # other examples are other statistics
    merge(again, "fisher", n_examples=48)
    assert again.stats_compute_count == len(again.tasks)


def test_a_changed_task_vector_is_a_new_statistics_key(tiny_workspace, tmp_path, _toy):
    base, finetuned, _, _ = _toy
    ev = tiny_workspace.evaluator
    merge(MergeInputs(tiny_workspace.tvs, ev, device="cpu", cache_dir=tmp_path), "fisher", n_examples=32)
    changed = {t: {k: v + (0.01 if t == "alpha" and k.endswith("bias") else 0.0) for k, v in sd.items()}
               for t, sd in finetuned.items()}
    other = MergeInputs(TaskVectorSet.from_state_dicts(base, changed), ev, device="cpu", cache_dir=tmp_path)
    merge(other, "fisher", n_examples=32)
    assert other.stats_compute_count == len(other.tasks)


def test_progress_is_reported_while_statistics_are_computed(tiny_workspace, tmp_path):
    seen = []
    inputs = MergeInputs(tiny_workspace.tvs, tiny_workspace.evaluator, device="cpu", cache_dir=tmp_path,
                         progress=lambda done, total, what: seen.append((done, total, what)))
    merge(inputs, "regmean", n_examples=16)
    assert seen and seen[-1][0] == seen[-1][1] == len(inputs.tasks)
    assert all("grams" in what for _, _, what in seen)


def test_fisher_with_equal_fishers_is_weight_averaging(inputs):
    equal = {t: {n: torch.ones(inputs.tvs.shape(n)) for n in inputs.tvs.param_names} for t in inputs.tasks}
    inputs.fisher = lambda n=256, split="train", seed=0: equal
    fisher = merge(inputs, "fisher")
    avg = merge(inputs, "weight_averaging")
    for name in inputs.tvs.param_names:
        torch.testing.assert_close(fisher[name], avg[name], rtol=1e-5, atol=1e-7)


def test_regmean_with_equal_grams_is_weight_averaging(inputs):
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = {n: x[:, :inputs.tvs.shape(n)[1]].T @ x[:, :inputs.tvs.shape(n)[1]]
         for n in inputs.tvs.param_names if len(inputs.tvs.shape(n)) == 2}
    equal = {t: dict(g) for t in inputs.tasks}
    inputs.activation_grams = lambda n=256, split="train", seed=0: equal
    reg = merge(inputs, "regmean", off_diagonal=1.0)
    avg = merge(inputs, "weight_averaging")
    for name in inputs.tvs.param_names:
        torch.testing.assert_close(reg[name], avg[name], rtol=1e-5, atol=1e-6)


def test_regmean_on_linear_regressions_is_the_joint_least_squares_fit(tmp_path):
    """A one-layer linear backbone; each task's model is its own least-squares fit.
    RegMean, with Grams measured by the real Evaluator, must give the joint fit."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out = 6, 4
    backbone = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    base = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    data, heads, fts, xs, ys = {}, {}, {}, [], []
    for t in range(3):
        x = torch.randn(30 + 5 * t, d_in, generator=g) * (1 + t)
        y = x @ torch.randn(d_out, d_in, generator=g).T + 0.2 * torch.randn(x.shape[0], d_out, generator=g)
        w = torch.linalg.lstsq(x.double(), y.double()).solution.T.float()
        labels = torch.zeros(len(x), dtype=torch.long)
        data[f"t{t}"] = {"train": FeatureSplit(x, labels), "validation": FeatureSplit(x, labels)}
        heads[f"t{t}"] = Head(torch.eye(2, d_out), torch.zeros(2))
        fts[f"t{t}"] = {"0.weight": w}
        xs.append(x.double()), ys.append(y.double())
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    tvs = TaskVectorSet.from_state_dicts(base, fts)
    ev = Evaluator(backbone, data, heads, device="cpu")
    inputs = MergeInputs(tvs, ev, device="cpu", cache_dir=tmp_path)
    delta = merge(inputs, "regmean", off_diagonal=1.0, n_examples=4096)
    merged = base["0.weight"].double() + delta["0.weight"].double()
    torch.testing.assert_close(merged, joint, rtol=1e-4, atol=1e-4)


def test_adding_a_method_is_one_module_and_one_registry_line(monkeypatch, tiny_workspace):
    """A method defined here, registered with one line, is offered and run by
    the engine, the availability check, scoring and the Merge page."""
    from analysis.merging.base import Hyperparameter

    def negated(group, params, ctx):
        return {n: -params["scale"] * group.deltas(n).mean(0) for n in group.names}

    method = MergeMethod("negated_mean", "minus the mean task vector", negated,
                         (Hyperparameter("scale", "float", 1.0, 0.0, 2.0, 0.1, "how far"),))
    monkeypatch.setitem(METHODS, method.name, method)          # the one registry line
    assert "negated_mean" in available_methods(3, has_data=False)
    out = merge(tiny_workspace.tvs, "negated_mean", scale=0.5, device="cpu")
    name = tiny_workspace.tvs.param_names[0]
    torch.testing.assert_close(out[name], -0.5 * tiny_workspace.tvs.deltas(name).mean(0))

    from pagetest import run_page
    at = run_page("3_Merge.py", tiny_workspace, {"method": "negated_mean", "scale": "0.5"})
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "negated_mean"
    assert at.slider(key="merge_negated_mean_scale").value == 0.5
