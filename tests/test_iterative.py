"""ATM and ColD Fusion (analysis.iterative): known answers, resumption, the tidy table."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analysis.errors import HyperparameterError, ValidationError
from analysis.evaluation import Evaluator
from analysis.iterative import IterativeConfig, load_run, preset, round_seed, run, run_folder, source_key
from analysis.iterative import runner
from analysis.iterative.training import finetune_from
from analysis.taskvectors import TaskVectorSet
from conftest import ToyBackbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def toy_eval(_toy):
    base, _, data, heads = _toy
    return Evaluator(ToyBackbone(base), data, heads, device="cpu")


def _cfg(procedure="atm", tasks=("alpha", "beta", "gamma"), **kw):
    fields = dict(rounds=2, total_steps=6, lr=0.02, batch_size=16, weight_decay=0.0)
    fields.update(kw)
    return IterativeConfig(procedure, tuple(tasks), **fields)


def _assert_states_equal(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- known answers
def test_one_round_of_atm_with_one_task_is_that_tasks_finetune(toy_eval, tmp_path):
    cfg = _cfg(tasks=("alpha",), rounds=1, total_steps=7, merge_knobs={"alpha": 1.0})
    result = run(cfg, toy_eval, tmp_path)
    base = {k: v.clone() for k, v in toy_eval.backbone.state_dict().items()}
    own = finetune_from(toy_eval, base, "alpha", 7, cfg, round_seed(0, "alpha", 1))
    assert any(not torch.equal(own[k], base[k]) for k in base)    # it did train
    # θ0 + 1·(θ_t − θ0) is θ_t up to float32 rounding of the subtraction and addition
    _assert_states_equal(result.final_state(), own, exact=False)


def test_cold_fusion_with_one_contributor_is_sequential_finetuning(toy_eval, tmp_path):
    cfg = _cfg("cold_fusion", tasks=("beta",), rounds=3, total_steps=9)
    result = run(cfg, toy_eval, tmp_path)
    state = {k: v.clone() for k, v in toy_eval.backbone.state_dict().items()}
    for r in (1, 2, 3):
        state = finetune_from(toy_eval, state, "beta", 3, cfg, round_seed(0, "beta", r))
    _assert_states_equal(result.final_state(), state, exact=False)
    # the average of one model is that model: the update is exactly what the fine-tune moved
    assert cfg.merge_method == "weight_averaging"


def test_geometry_cosines_known_by_construction():
    base = {"w": torch.zeros(4)}
    orth = TaskVectorSet.from_state_dicts(base, {"a": {"w": torch.tensor([1., 0, 0, 0])},
                                                 "b": {"w": torch.tensor([0., 2, 0, 0])}})
    geo = runner._geometry(orth, {"w": torch.tensor([3., 4, 0, 0])})
    assert geo["cosine"] == pytest.approx(0.0) and geo["update_norm"] == pytest.approx(5.0)
    assert geo["task_vector_norm"] == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}
    same = TaskVectorSet.from_state_dicts(base, {t: {"w": torch.tensor([1., 1, 0, 0]) * (i + 1)}
                                                 for i, t in enumerate("abc")})
    assert runner._geometry(same, {"w": torch.zeros(4)})["cosine"] == pytest.approx(1.0)
    opposite = TaskVectorSet.from_state_dicts(base, {"a": {"w": torch.ones(4)}, "b": {"w": -torch.ones(4)}})
    assert runner._geometry(opposite, {"w": torch.zeros(4)})["cosine"] == pytest.approx(-1.0)


# ---------------------------------------------------------------- resumption and caching
class Killed(Exception):
    pass


def test_interrupted_run_resumes_to_the_uninterrupted_result(toy_eval, tmp_path):
    cfg = _cfg(rounds=3, total_steps=9, merge_method="tsv_m")
    whole = run(cfg, toy_eval, tmp_path / "whole")

    def kill_after_round_1(fraction, message):
        if message.startswith("round 1/3 done"):
            raise Killed
    with pytest.raises(Killed):
        run(cfg, toy_eval, tmp_path / "cut", progress=kill_after_round_1)
    folder = run_folder(cfg, source_key(toy_eval, cfg.tasks), tmp_path / "cut")
    partial = load_run(folder)
    assert not partial.finished and partial.rounds_done == 1
    # a round cut short mid-write is a temp folder; it must never be read, only redone
    junk = folder / ".round_002.tmp"
    junk.mkdir()
    (junk / "metrics.json").write_text("{not json")
    round1 = (folder / "round_001" / "metrics.json").stat().st_mtime_ns
    seen = []
    resumed = run(cfg, toy_eval, tmp_path / "cut", progress=lambda f, m: seen.append(m))
    assert not any(m.startswith("round 1/3") for m in seen)          # round 1 was not redone
    assert (folder / "round_001" / "metrics.json").stat().st_mtime_ns == round1
    assert not junk.exists() and resumed.finished
    _assert_states_equal(resumed.final_state(), whole.final_state(), exact=True)
    pd.testing.assert_frame_equal(resumed.table, whole.table)
    assert not (folder / "round_001" / runner.MODEL_FILE).exists()   # only the last model is kept


def test_finished_run_is_found_by_content_not_recomputed(toy_eval, tmp_path, monkeypatch):
    cfg = _cfg(rounds=1, total_steps=2)
    first = run(cfg, toy_eval, tmp_path)
    monkeypatch.setattr(runner, "finetune_from", lambda *a, **k: pytest.fail("a finished run fine-tuned again"))
    again = run(cfg, toy_eval, tmp_path)
    pd.testing.assert_frame_equal(first.table, again.table)
    # a changed knob is a different run, in its own folder
    other = _cfg(rounds=1, total_steps=2, lr=0.01)
    assert run_folder(other, "x", tmp_path) != run_folder(cfg, "x", tmp_path)
    assert json.loads((first.folder / "config.json").read_text())["config"]["lr"] == 0.02


# ---------------------------------------------------------------- the table
def test_round_metrics_come_back_as_a_tidy_table(toy_eval, tmp_path):
    cfg = _cfg(rounds=2, total_steps=4)
    result = run(cfg, toy_eval, tmp_path)
    t = result.table
    assert list(t.columns) == runner.COLUMNS
    assert sorted(t["round"].unique()) == [0, 1, 2]
    assert set(t["metric"]) == {"accuracy", "mean_accuracy", "cosine", "update_norm", "task_vector_norm"}
    assert not t.duplicated(["round", "task", "metric"]).any()
    acc = result.metric("accuracy")
    mean = result.metric("mean_accuracy")["mean"]
    pd.testing.assert_series_equal(acc[list(cfg.tasks)].mean(axis=1), mean, check_names=False)
    assert set(t.loc[t["round"] == 0, "metric"]) == {"accuracy", "mean_accuracy"}   # the starting model
    # round 0 is the base: its accuracy is the evaluator's on the base
    base = toy_eval.evaluate(None, split="test")
    base = base[base["metric"] == "accuracy"].set_index("task")["value"]
    assert acc.loc[0].to_dict() == pytest.approx(base.to_dict())
    cos = result.metric("cosine")["all"]
    assert ((cos > -1) & (cos < 1)).all()
    steps = t[(t["metric"] == "accuracy") & (t["task"] == "alpha")].set_index("round")["steps"]
    assert steps.to_dict() == {0: 0, 1: 2, 2: 4}
    # the update norm is ‖θ_R − θ_{R-1}‖: with one round, ‖final − base‖ over the parameters
    one = run(_cfg(rounds=1, total_steps=2), toy_eval, tmp_path)
    final, b = one.final_state(), toy_eval.backbone.state_dict()
    norm = sum(float((final[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    assert one.metric("update_norm")["all"].iloc[0] == pytest.approx(norm, rel=1e-5)


def test_cold_fusion_heldout_probe_rows_on_the_tiny_demo(tiny_demo_dir, tmp_path):
    from analysis.zoo import load_demo
    demo = load_demo(tiny_demo_dir)
    cfg = preset("tiny", "cold_fusion", demo.tasks[:2], demo.manifest["config"], heldout=demo.tasks[2:],
                 total_steps=4, heldout_steps=3)
    assert cfg.rounds == 2 and cfg.merge_method == "weight_averaging"
    result = run(cfg, demo.evaluator, tmp_path)
    held = demo.tasks[2]
    probe = result.metric("heldout_probe_accuracy")
    tuned = result.metric("heldout_finetune_accuracy")
    assert list(probe.index) == [0, 1, 2] and set(probe.columns) == {held, "mean"}
    assert probe[held].between(0, 1).all() and tuned[held].between(0, 1).all()
    # held-out tasks are scored but never fused: no task vector of theirs
    assert held not in set(result.table.loc[result.table["metric"] == "task_vector_norm", "task"])
    assert held in result.final_accuracy()
    mean = result.metric("mean_accuracy")["mean"]
    acc = result.metric("accuracy")
    pd.testing.assert_series_equal(acc[demo.tasks[:2]].mean(axis=1), mean, check_names=False)
    delta = result.final_delta(demo.tvs)
    assert set(delta) == set(demo.tvs.param_names)


# ---------------------------------------------------------------- presets and bad input
def test_presets_match_the_builds_budget():
    quick = preset("quick", "atm", ["a", "b"], {"ft_steps": 60, "ft_lr": 1e-4, "ft_batch": 16, "weight_decay": 0.01})
    assert quick.rounds == 3 and [quick.steps("a", r) for r in (1, 2, 3)] == [20, 20, 20]
    assert quick.merge_method == "task_arithmetic" and quick.lr == 1e-4
    full = preset("full", "cold_fusion", ["a", "b"], {"ft_steps": 500, "ft_max_epochs": 10.0, "ft_batch": 32},
                  train_sizes={"a": 3000, "b": 460}, heldout=["c"])
    assert full.task_budget("a") == 500 and full.task_budget("b") == 143     # the build's epoch cap
    assert [full.steps("b", r) for r in range(1, 6)] == [29, 29, 29, 28, 28]
    assert sum(full.steps("b", r) for r in range(1, 6)) == 143


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tasks=("alpha", "nope")), "'nope'"),
    (dict(procedure="cold_fusion", heldout=("alpha",)), "both fused and held out"),
    (dict(heldout=("gamma",), tasks=("alpha",)), "ATM has none"),
    (dict(merge_method="tsv_c"), "its own model"),
    (dict(merge_method="slerp"), "exactly 2"),
    (dict(rounds=0), "rounds"),
    (dict(rounds=4, total_steps=3), "each of 4 rounds"),
    (dict(eval_split="nope"), "'nope'"),
])
def test_bad_configurations_name_the_value_at_fault(toy_eval, tmp_path, kwargs, needle):
    fields = dict(procedure="atm", tasks=("alpha", "beta", "gamma"))
    fields.update(kwargs)
    with pytest.raises(ValidationError, match=needle):
        run(_cfg(**fields), toy_eval, tmp_path)
    assert not (tmp_path / "iterative").exists()      # nothing written for a bad configuration


def test_bad_merge_knob_is_a_hyperparameter_error(toy_eval, tmp_path):
    with pytest.raises(HyperparameterError, match="'alpha'"):
        run(_cfg(merge_knobs={"alpha": -1.0}), toy_eval, tmp_path)
    with pytest.raises(HyperparameterError, match="unknown merging method 'nope'"):
        run(_cfg(merge_method="nope"), toy_eval, tmp_path)


def test_cli_runs_cold_fusion_on_the_tiny_demo_and_writes_the_table(tiny_demo_dir, tmp_path, capsys):
    from analysis.zoo.__main__ import main
    out = tmp_path / "rounds.csv"
    args = ["cold-fusion", "--tiny", "--cache-dir", str(tiny_demo_dir), "--steps", "2", "--heldout-steps", "2",
            "--heldout", "toy_animal", "--csv", str(out)]
    assert main(args) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == runner.COLUMNS and sorted(table["round"].unique()) == [0, 1, 2]
    assert set(table.loc[table["metric"] == "heldout_probe_accuracy", "task"]) == {"toy_animal", "mean"}
    printed = capsys.readouterr().out
    assert "heldout_probe_accuracy" in printed and "iterative/cold_fusion-" in printed
    assert main(["atm", "--tiny", "--cache-dir", str(tiny_demo_dir), "--method", "nope"]) == 1
    assert "unknown merging method 'nope'" in capsys.readouterr().err
