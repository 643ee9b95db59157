"""One way to run a page under Streamlit's AppTest with injected state, and the helpers the URL tests share."""
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


def run_app(workspace, timeout: int = 120) -> AppTest:
    """Run app.py (Home) once with `workspace` injected: the start of a multi-page session."""
    at = AppTest.from_file(str(PAGES.parent / "app.py"), default_timeout=timeout)
    at.session_state["workspace"] = workspace
    return at.run()


def url_params(at: AppTest) -> dict:
    """The page's query parameters, a one-value list as its value."""
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in at.query_params.items()}


def leave_and_return(at: AppTest, page: str, widget_key: str) -> AppTest:
    """Switch to Spectra and back to `page` as a user does: Streamlit forgets `widget_key` on the way (so the
    URL memory must restore it) and the page comes back with a bare URL."""
    at.switch_page("pages/1_Spectra.py").run()
    assert not at.exception, at.exception
    assert widget_key not in at.session_state
    at.query_params.clear()
    return at.switch_page(page).run()
