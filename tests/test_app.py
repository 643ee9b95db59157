"""AppTest of the home page: load through the path form, see the summary; bad input -> st.error."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from pathlib import Path

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _table(at: AppTest, column: str):
    """The first dataframe shown with `column` (AppTest does not expose dataframe keys)."""
    for df in at.dataframe:
        if column in df.value.columns or df.value.index.name == column:
            return df.value
    raise AssertionError(f"no table with column {column!r}; tables: {[list(d.value.columns) for d in at.dataframe]}")


def _own_checkpoints(at: AppTest) -> AppTest:
    at.run()
    at.radio(key="home_source").set_value("Your checkpoints").run()
    return at


def _fill(at, base, lines, exclude=""):
    at.text_input(key="home_base").input(str(base))
    at.text_area(key="home_tasks").input(lines)
    at.text_input(key="home_exclude").input(exclude)
    at.button[0].click()  # the form's submit button
    return at.run()


def test_loads_tiny_set_from_paths_and_shows_summary(tiny_checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    at = _own_checkpoints(AppTest.from_file(APP, default_timeout=60))
    lines = "\n".join(f"{t} = {p}" for t, p in tiny_checkpoints["tasks"].items())
    _fill(at, tiny_checkpoints["base"], lines, r"^classifier\.")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    ws = at.session_state["workspace"]
    assert ws.tvs.tasks == ["alpha", "beta", "gamma"]
    assert "classifier.weight" not in ws.tvs.param_names
    tasks_table = _table(at, "l2_norm")
    assert list(tasks_table["task"]) == ["alpha", "beta", "gamma"]
    assert (tasks_table["l2_norm"] > 0).all()
    kinds = _table(at, "kind").set_index("kind")
    assert kinds.loc["matrix", "parameters"] == 16 * 8 + 16 * 16
    assert kinds.loc["vector", "tensors"] == 3
    layers = _table(at, "depth").set_index("depth")
    assert layers.loc["0", "tensors"] == 2 and layers.loc["outside blocks", "tensors"] == 1
    assert any("Device" in m.value for m in at.markdown)
    assert any(str(tmp_path / "cache") in m.value for m in at.markdown)


@pytest.mark.parametrize("case", ["missing_base", "bad_line", "bad_regex", "head_mismatch"])
def test_bad_input_is_an_error_message_not_an_exception(case, tiny_checkpoints, tmp_path):
    at = _own_checkpoints(AppTest.from_file(APP, default_timeout=60))
    good = "\n".join(f"{t} = {p}" for t, p in tiny_checkpoints["tasks"].items())
    base, lines, exclude = tiny_checkpoints["base"], good, r"^classifier\."
    if case == "missing_base":
        base = tmp_path / "nope.safetensors"
    elif case == "bad_line":
        lines = "alpha " + str(tiny_checkpoints["tasks"]["alpha"])
    elif case == "bad_regex":
        exclude = "([unclosed"
    elif case == "head_mismatch":
        # the toy files hold different 'classifier.weight' values but same shape: make one a different shape
        from safetensors.torch import load_file, save_file
        import torch
        p = tmp_path / "odd.safetensors"
        sd = load_file(str(tiny_checkpoints["tasks"]["alpha"]))
        sd["classifier.weight"] = torch.zeros(5, 16)
        save_file(sd, str(p))
        lines, exclude = f"odd = {p}", ""
    _fill(at, base, lines, exclude)
    assert not at.exception, at.exception
    assert at.error, "expected an st.error message"
    msg = at.error[0].value
    assert "Could not load" in msg
    if case == "missing_base":
        assert "nope.safetensors" in msg
    if case == "head_mismatch":
        assert "classifier.weight" in msg and "shape" in msg
    assert "workspace" not in at.session_state


def test_state_survives_a_rerun_and_the_radio_follows_it(tiny_workspace):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["workspace"] = tiny_workspace
    at.run()
    assert not at.exception
    # an own set is loaded: the page opens on "Your checkpoints" and never swaps in the demo
    assert at.radio(key="home_source").value == "Your checkpoints"
    assert at.session_state["workspace"] is tiny_workspace
    assert list(_table(at, "l2_norm")["task"]) == ["alpha", "beta", "gamma"]
    assert _table(at, "zero_shot").shape[0] == 3


def test_demo_option_says_plainly_when_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    text = " ".join(w.value for w in at.warning) + " ".join(i.value for i in at.info)
    assert "not built yet" in text or "not part of this installation" in text
    if "not built yet" in text:
        assert at.button(key="home_build").label.startswith("Build the quick demo")


def test_demo_option_opens_a_built_demo(tiny_demo_dir, monkeypatch):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tiny_demo_dir))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    ws = at.session_state["workspace"]
    assert ws.name == "demo" and ws.evaluator is not None and len(ws.tvs.tasks) == 3
    assert any("Demo loaded" in s.value for s in at.success)
    assert list(_table(at, "l2_norm")["task"]) == ws.tvs.tasks


def test_background_job_reports_progress_result_and_errors():
    import time
    from ui.jobs import BackgroundJob

    def work(report):
        report(0.5, "half")
        return 42

    job = BackgroundJob(work, "t")
    job._thread.join(5)
    assert not job.running and job.result == 42 and job.error is None and job.state() == (0.5, "half")

    def fail(report):
        raise RuntimeError("disk full")

    bad = BackgroundJob(fail, "f")
    bad._thread.join(5)
    assert isinstance(bad.error, RuntimeError) and "disk full" in bad.details and bad.elapsed < 5


def test_home_opens_the_demo_while_the_build_still_trains_the_transformer_zoo(tiny_demo_dir, tmp_path, monkeypatch):
    """The build button runs the demo build then the transformer zoo (one command); once the demo part is
    on disk Home opens it and says the rest is still training."""
    import threading
    import time
    import analysis.zoo.transformers as zoo_transformers
    release, demo_done = threading.Event(), threading.Event()

    def fake_build(kind, root, progress=None):
        assert kind == "quick"
        for folder in tiny_demo_dir.glob("zoo-*"):   # the demo part: a finished build appears in the cache
            (root / folder.name).symlink_to(folder, target_is_directory=True)
        progress(0.8, "transformer zoo: training seed 1")
        demo_done.set()
        release.wait(60)
        return root, root

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MERGESCOPE_CACHE", str(cache))
    monkeypatch.setattr(zoo_transformers, "build_demo_and_transformer_zoo", fake_build)
    at = AppTest.from_file(APP, default_timeout=120).run()
    try:
        at.button(key="home_build").click().run()
        assert demo_done.wait(30)
        time.sleep(0.2)
        at.run()
        assert not at.exception, at.exception
        assert any("Demo loaded" in s.value for s in at.success)
        assert any("transformer zoo" in c.value and "80 %" in c.value for c in at.caption)
        assert at.session_state["workspace"].name == "demo"
    finally:
        release.set()
