"""The progress bar of `ui.state.with_progress` is live and never replayed from a cache.

Streamlit records the elements a cached function draws and replays them on a
cache hit. A progress bar drawn by a statistics computation inside a cached
merge was replayed on every later rerun and never emptied: it stayed on the
Curvature and Merge pages, and the browser tests saw a page that never went
idle."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest


def script():
    import streamlit as st

    from ui.state import with_progress

    class Inputs:   # what with_progress uses of a MergeInputs
        progress = None

    inputs = Inputs()

    @st.cache_data(show_spinner=False)
    def cached_work(x):
        inputs.progress(1, 1, "task a")   # as statistics do, from inside a cached merge
        return x

    with with_progress(inputs, "statistics"):
        st.markdown(f"result {cached_work(1)}")


def test_a_progress_bar_drawn_inside_a_cached_function_is_gone_on_cache_hits():
    at = AppTest.from_function(script)
    for run in range(3):   # the first run computes; the others are cache hits
        at.run(timeout=120)
        assert not at.exception, at.exception
        assert [e.type for e in at.main if e.type == "progress"] == [], f"run {run}: a progress bar was left"
        assert [m.value for m in at.markdown] == ["result 1"]
