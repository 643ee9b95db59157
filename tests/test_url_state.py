"""ui/url.py, ui/workspaces.py, ui/history.py: links hold a page's choices and its workspace; state survives
page switches."""
from __future__ import annotations

from pathlib import Path

import pytest
from pagetest import leave_and_return, run_app, run_page, url_params
from streamlit.testing.v1 import AppTest

from ui.url import parse_param, to_text
from ui.workspaces import WorkspaceUnavailable, checkpoint_recipe, recipe_from_query, recipe_to_query

APP = str(Path(__file__).resolve().parents[1] / "app.py")


class FakeQuery(dict):
    """st.query_params' reading API over {key: [values]}."""

    def get(self, key, default=None):
        values = dict.get(self, key)
        return values[-1] if values else default

    def get_all(self, key):
        return list(dict.get(self, key, []))


def _query(params: dict) -> FakeQuery:
    return FakeQuery({k: v if isinstance(v, list) else [v] for k, v in params.items()})


# ---------------------------------------------------------------- values as text
@pytest.mark.parametrize("default, texts, options, lo, hi, expected", [
    (False, ["true"], None, None, None, True),
    (True, ["0"], None, None, None, False),
    (5, ["7"], None, 3, 21, 7),
    (0.3, ["0.125"], None, 0.0, 3.0, 0.125),
    (0.3, [to_text(0.1 + 0.2)], None, None, None, 0.1 + 0.2),          # floats travel exactly
    ("validation", ["test"], ["validation", "test"], None, None, "test"),
    (16, ["64"], [8, 16, 32, 64], None, None, 64),                       # select_slider of ints
    (0.95, ["0.90"], [0.8, 0.9, 0.95], None, None, 0.9),
    (["a", "b"], ["b"], ["a", "b", "c"], None, None, ["b"]),
    (["a", "b"], [""], ["a", "b", "c"], None, None, []),                 # one empty value: the empty list
    ((0.0, 1.5), ["0.5", "2.0"], None, 0.0, 3.0, (0.5, 2.0)),            # a range slider
])
def test_parse_param_reads_what_to_text_writes(default, texts, options, lo, hi, expected):
    assert parse_param(texts, default, options, None, lo, hi) == expected


@pytest.mark.parametrize("default, texts, options, lo, hi, message", [
    (5, ["99"], None, 3, 21, "outside the allowed range [3, 21]"),
    (5, ["2.5"], None, 3, 21, "whole number"),
    (0.3, ["nan"], None, None, None, "finite"),
    (True, ["maybe"], None, None, None, "true or false"),
    ("validation", ["train"], ["validation", "test"], None, None, "not one of the choices here (validation, test)"),
    ((0.0, 1.5), ["0.5"], None, 0.0, 3.0, "expected 2 values"),
])
def test_parse_param_names_what_is_wrong(default, texts, options, lo, hi, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_param(texts, default, options, None, lo, hi)


# ---------------------------------------------------------------- the workspace in the URL
def test_workspace_recipes_round_trip_through_the_query():
    recipes = [{"kind": "demo", "preset": "quick", "build": "1a2b3c"},
               checkpoint_recipe("/m/base", [("sst2", "/m/sst2"), ("mnli", "/m/a=b")], [r"^classifier\."]),
               {"kind": "set", "path": "/sets/my.safetensors"}]
    for recipe in recipes:
        assert recipe_from_query(_query(recipe_to_query(recipe))) == recipe
    assert recipe_to_query(recipes[0]) == {"ws": "demo-quick", "ws_build": "1a2b3c"}
    assert recipe_from_query(_query({"ws": "demo-full"})) == {"kind": "demo", "preset": "full"}
    assert recipe_from_query(_query({})) is None
    with pytest.raises(WorkspaceUnavailable, match="`ws_task=sst2` is not of the form name=path"):
        recipe_from_query(_query({"ws": "own", "ws_base": "/m", "ws_task": "sst2"}))
    with pytest.raises(WorkspaceUnavailable, match="ws=zoo"):
        recipe_from_query(_query({"ws": "zoo"}))


def test_a_link_to_a_demo_that_is_not_built_says_exactly_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "empty"))
    at = run_page("3_Merge.py", query={"ws": "demo-quick", "method": "ties"})
    assert not at.exception, at.exception
    text = " ".join(w.value for w in at.warning)
    assert f"the quick demo is not built in `{tmp_path / 'empty'}`: build it from **Home**" in text
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["ws"] = "demo-tiny"
    at.run()
    assert not at.exception, at.exception
    assert any("tiny test demo is not built" in w.value and "python -m analysis.zoo build --tiny" in w.value
               for w in at.warning)


def test_a_link_to_own_checkpoints_reopens_them_in_a_new_session(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    recipe = checkpoint_recipe(str(tiny_checkpoints["base"]), tiny_checkpoints["tasks"].items(), [r"^classifier\."])
    query = {**recipe_to_query(recipe), "method": "ties", "density": "0.4"}
    at = run_page("3_Merge.py", query=query)
    assert not at.exception, at.exception
    ws = at.session_state["workspace"]
    assert ws.tvs.tasks == ["alpha", "beta", "gamma"] and ws.recipe == recipe
    assert at.selectbox(key="merge_method").value == "ties" and at.slider(key="merge_ties_density").value == 0.4
    url = at.query_params
    assert url["ws"] in ("own", ["own"]) and len(url["ws_task"]) == 3   # the link keeps naming the set
    # a checkpoint gone from disk: said, with its path
    missing = {**query, "ws_task": [f"alpha={tmp_path / 'gone.safetensors'}"]}
    at = run_page("3_Merge.py", query=missing)
    assert not at.exception, at.exception
    assert any("checkpoint of task 'alpha'" in w.value and "gone.safetensors" in w.value and "does not exist" in w.value
               for w in at.warning)


# ---------------------------------------------------------------- state survives page switches
def test_merge_choices_survive_a_page_switch(tiny_workspace):
    at = run_app(tiny_workspace)
    at.switch_page("pages/3_Merge.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="merge_method").set_value("ties").run()
    at.slider(key="merge_ties_density").set_value(0.4).run()
    leave_and_return(at, "pages/3_Merge.py", "merge_method")
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "ties"
    assert at.slider(key="merge_ties_density").value == 0.4
    assert url_params(at)["method"] == "ties" and float(url_params(at)["density"]) == 0.4


def test_a_landscape_link_names_a_merge_by_its_recipe(tiny_workspace):
    label = "merge: task_arithmetic (alpha=0.5)"
    at = run_page("4_Loss_Landscape.py", tiny_workspace, {"ll_start": "pretrained", "ll_end": label, "ll_points": "3", "ll_sub": "16"})
    assert not at.exception, at.exception
    assert at.selectbox(key="ll_end").value == label        # no history in this session: offered from the link
    curves = tiny_workspace.extras["landscape_last"]["curves"]
    direct = tiny_workspace.evaluator.evaluate_delta(tiny_workspace.tvs.sum(), alpha=0.5, split="validation",
                                                     subsample=16)
    end = curves[curves.lam == 1].set_index(["task", "metric"])["value"]
    assert end.loc[("beta", "loss")] == pytest.approx(
        direct.set_index(["task", "metric"])["value"].loc[("beta", "loss")], rel=1e-5)
    at = run_page("4_Loss_Landscape.py", tiny_workspace, {"ll_end": "merge: nope (x=1)"})
    assert not at.exception, at.exception
    assert any("merge: nope (x=1)" in w.value for w in at.warning)
    assert at.selectbox(key="ll_end").value.startswith("fine-tuned")


def test_report_removes_history_rows(tiny_workspace):
    hist = [{"method": "task_arithmetic", "knobs": {"alpha": a}, "split": "validation", "subsample": None,
             "per_task": {t: 0.5 + a / 10 for t in tiny_workspace.tvs.tasks}, "mean": 0.5 + a / 10}
            for a in (0.3, 0.7)]
    at = run_page("5_Report.py", tiny_workspace, merge_history=hist)
    assert not at.exception, at.exception
    pick = at.multiselect(key="rp_history_remove_pick")
    assert pick.options == ["#1 task_arithmetic (alpha=0.3)", "#2 task_arithmetic (alpha=0.7)"]
    pick.set_value(["#1 task_arithmetic (alpha=0.3)"]).run()
    at.button(key="rp_history_remove").click().run()
    assert not at.exception, at.exception
    assert [h["knobs"]["alpha"] for h in at.session_state["merge_history"]] == [0.7]
    configs = set(at.dataframe[0].value["config"])
    assert "#1 task_arithmetic (alpha=0.7)" in configs and not any("0.3" in c for c in configs)


def test_a_report_link_scores_the_rows_it_was_made_with(tiny_workspace):
    from ui.history import entry_text, score_entry
    from analysis.merging import METHODS
    knobs = METHODS["ties"].validate({"density": 0.4, "alpha": 1.0}, 3)   # every knob, as the Merge page keeps them
    row = score_entry(tiny_workspace, "ties", knobs, "validation", 16)
    text = entry_text(row)
    assert text.startswith("ties (") and text.endswith(" @ validation · 16")
    at = run_page("5_Report.py", tiny_workspace, {"rp_rows": [text, "nope (x=1) @ validation · 16"],
                                                  "rp_chart": "radar"})
    assert not at.exception, at.exception
    hist = at.session_state["merge_history"]
    assert len(hist) == 1 and hist[0]["method"] == "ties" and hist[0]["subsample"] == 16
    assert hist[0]["per_task"] == pytest.approx(row["per_task"])
    assert hist[0]["knobs"] == row["knobs"]
    assert any("nope (x=1)" in w.value for w in at.warning)
    assert at.radio(key="rp_chart").value == "radar"
    assert at.query_params["rp_rows"] in (text, [text])     # the bad row is not carried on


def test_a_link_to_a_saved_set_reopens_it(tiny_workspace, tmp_path):
    path = tiny_workspace.tvs.save(tmp_path / "sets" / "toy.safetensors")
    at = run_page("2_Interference.py", query={"ws": "set", "ws_path": str(path), "if_by_layer": "sign-conflict rate"})
    assert not at.exception, at.exception
    ws = at.session_state["workspace"]
    assert ws.tvs.tasks == tiny_workspace.tvs.tasks and ws.recipe == {"kind": "set", "path": str(path)}
    assert at.radio(key="interference_by_layer").value == "sign-conflict rate"
    at = run_page("2_Interference.py", query={"ws": "set", "ws_path": str(tmp_path / "nope.safetensors")})
    assert not at.exception, at.exception
    assert any("saved task-vector set" in w.value and "nope.safetensors" in w.value for w in at.warning)
