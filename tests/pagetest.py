"""One way to run a page under Streamlit's AppTest with injected state."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parents[1] / "pages"


def run_page(page: str, workspace=None, query: dict | None = None, timeout: int = 120, **state) -> AppTest:
    """Run pages/<page> once: `workspace` and any other `state` go into
    st.session_state, `query` into the URL's query parameters."""
    at = AppTest.from_file(str(PAGES / page), default_timeout=timeout)
    if workspace is not None:
        at.session_state["workspace"] = workspace
    for key, value in state.items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()
