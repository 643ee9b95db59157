"""AppTest of the home page with your own data: a Hugging Face set with data lines loads with an
Evaluator and shows each task's head and split; data on non-runnable checkpoints, and data files
with errors, are error messages naming what is wrong."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _load(base, tasks: dict, data: str, monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.radio(key="home_source").set_value("Your checkpoints").run()
    at.text_input(key="home_base").input(str(base))
    at.text_area(key="home_tasks").input("\n".join(f"{t} = {p}" for t, p in tasks.items()))
    at.text_area(key="home_data").input(data)
    at.number_input(key="home_max_len").set_value(16)
    at.button[0].click()  # the form's submit button
    return at.run()


def test_hugging_face_set_with_a_data_folder(tiny_bert_dir, monkeypatch, tmp_path):
    folder = tiny_bert_dir["data"]["topic"].parent
    at = _load(tiny_bert_dir["base"], tiny_bert_dir["tasks"], str(folder), monkeypatch, tmp_path)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    ws = at.session_state["workspace"]
    assert ws.evaluator.tasks == ["sentiment", "topic"] and set(ws.reference["model"]) == {"zero_shot", "fine_tuned"}
    assert ws.extras["own"].pooling == "pooler" and ws.extras["head_usage"].startswith("logits = pooler_output")
    text = " ".join(m.value for m in at.markdown)
    assert "**topic** — head: from the checkpoint: classifier on the pooler output" in text
    assert "56 train / 12 validation / 12 test · split seeded 70/15/15 per label (seed 0)" in text
    assert any("Rows with a `split` column keep their split" in c.value for c in at.caption)


def test_a_bad_row_is_named(tiny_bert_dir, monkeypatch, tmp_path):
    bad = tmp_path / "topic.csv"
    bad.write_text("text,label\nthe goal,sports\nthe senate,weather\n")
    at = _load(tiny_bert_dir["base"], tiny_bert_dir["tasks"], f"topic = {bad}", monkeypatch, tmp_path)
    assert not at.exception, at.exception
    assert at.error and f"{bad}, row 3, column 'label': 'weather' is not one of the head's classes" in at.error[0].value
    assert "workspace" not in at.session_state


def test_data_needs_runnable_checkpoints(tiny_checkpoints, tiny_bert_dir, monkeypatch, tmp_path):
    at = _load(tiny_checkpoints["base"], tiny_checkpoints["tasks"], f"alpha = {tiny_bert_dir['data']['topic']}",
               monkeypatch, tmp_path)
    assert not at.exception, at.exception
    assert at.error and "attaching data needs Hugging Face folders" in at.error[0].value
