"""AppTest of pages/8_Iterative.py on the tiny workspace: a run in the background, its curves, the history."""
from __future__ import annotations

import time

import pytest
import torch
from pagetest import leave_and_return, run_app, run_page, url_params

from analysis.paths import cache_root

PAGE = "8_Iterative.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wait_for_finished_run(timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = list((cache_root() / "iterative").glob("*/run.json"))
        if done:
            return done[0].parent
        time.sleep(0.5)
    pytest.fail("the background run did not finish")


def test_cold_fusion_runs_in_the_background_and_joins_the_history(tiny_workspace):
    at = run_page(PAGE, tiny_workspace)
    assert not at.exception, at.exception
    at.radio(key="it_procedure").set_value("cold_fusion").run()
    assert at.multiselect(key="it_heldout").value == ["gamma"]      # 3 tasks: the last one is held out
    at.number_input(key="it_rounds_quick").set_value(2).run()
    at.number_input(key="it_steps_quick").set_value(4).run()
    at.number_input(key="it_hsteps_quick").set_value(2).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="it_method_cold_fusion").value == "weight_averaging"
    at.button(key="it_start").click().run()
    assert not at.exception, at.exception
    folder = _wait_for_finished_run()
    assert folder.name.startswith("cold_fusion-")
    for _ in range(40):   # the job's thread ends just after run.json is written
        at.run()
        if "merge_history" in at.session_state and at.session_state["merge_history"]:
            break
        time.sleep(0.25)
    assert not at.exception, at.exception
    keys = {c.key for c in at.get("plotly_chart")}
    assert {"it_accuracy", "it_geometry", "it_heldout_curves"} <= keys
    entry = at.session_state["merge_history"][-1]
    assert entry["method"] == "cold_fusion" and entry["knobs"]["rounds"] == 2
    assert set(entry["per_task"]) == {"alpha", "beta", "gamma"} and entry["split"] == "test"
    # the Report reads the entry like any other configuration, and the endpoint is the saved model
    from ui.endpoints import delta_of, history_configs
    cfg = next(iter(history_configs([entry]).values()))
    delta = delta_of(tiny_workspace, {"kind": "merge", **cfg})
    assert set(delta) == set(tiny_workspace.tvs.param_names)
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    base = {n: tiny_workspace.tvs.base_tensor(n) for n in tiny_workspace.tvs.param_names}
    acc = tiny_workspace.evaluator.evaluate({n: base[n] + delta[n] for n in base}, split="test")
    acc = acc[acc["metric"] == "accuracy"].set_index("task")["value"]
    assert acc.to_dict() == pytest.approx(entry["per_task"])
    report = run_page("5_Report.py", tiny_workspace, merge_history=at.session_state["merge_history"])
    assert not report.exception, report.exception
    table = next(d.value for d in report.dataframe if "config" in getattr(d.value, "columns", []))
    assert any(str(c).startswith("#1 cold_fusion") for c in table["config"])
    # opening the page again shows the cached run, without a start button
    again = run_page(PAGE, tiny_workspace, it_procedure="cold_fusion", it_rounds_quick=2, it_steps_quick=4,
                     it_hsteps_quick=2)
    assert not again.exception, again.exception
    assert not [b for b in again.button if b.key == "it_start"]
    assert any("Finished" in s.value for s in again.success)


def test_without_labelled_data_the_page_says_so(tiny_workspace):
    from dataclasses import replace
    at = run_page(PAGE, replace(tiny_workspace, evaluator=None))
    assert not at.exception, at.exception
    assert any("has none" in i.value for i in at.info)


def test_a_link_restores_every_choice_and_another_preset_starts_from_its_own_budget(tiny_workspace):
    link = {"it_procedure": "cold_fusion", "it_preset": "quick", "it_heldout": ["beta"], "it_rounds": "2",
            "it_steps": "6", "it_hsteps": "3", "it_method": "task_arithmetic", "it_subsample": "50"}
    at = run_page(PAGE, tiny_workspace, link)
    assert not at.exception, at.exception
    assert at.radio(key="it_procedure").value == "cold_fusion"
    assert at.multiselect(key="it_heldout").value == ["beta"]
    assert at.number_input(key="it_rounds_quick").value == 2 and at.number_input(key="it_steps_quick").value == 6
    assert at.number_input(key="it_hsteps_quick").value == 3 and at.number_input(key="it_subsample").value == 50
    assert at.selectbox(key="it_method_cold_fusion").value == "task_arithmetic"
    assert {k: url_params(at)[k] for k in link} == {**link, "it_heldout": "beta"}   # the page writes back what it shows
    # the full preset's budget is its own, not the quick one's the link named
    at.selectbox(key="it_preset").set_value("full").run()
    assert not at.exception, at.exception
    assert at.number_input(key="it_rounds_full").value == 5 and url_params(at)["it_rounds"] == "5"


def test_choices_survive_a_page_switch(tiny_workspace):
    at = run_app(tiny_workspace)
    at.switch_page("pages/8_Iterative.py").run()
    assert not at.exception, at.exception
    at.radio(key="it_procedure").set_value("cold_fusion").run()
    at.number_input(key="it_rounds_quick").set_value(4).run()
    leave_and_return(at, "pages/8_Iterative.py", "it_rounds_quick")
    assert not at.exception, at.exception
    assert at.radio(key="it_procedure").value == "cold_fusion"
    assert at.number_input(key="it_rounds_quick").value == 4 and url_params(at)["it_rounds"] == "4"
