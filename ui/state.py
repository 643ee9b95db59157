"""The loaded workspace, kept in st.session_state so it survives page switches.

Tests inject a workspace with `AppTest.session_state["workspace"] = Workspace(...)`.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st

from analysis.errors import MergescopeError
from analysis.merging.inputs import MergeInputs
from analysis.paths import cache_root  # noqa: F401  (re-exported: pages and app.py import it from here)
from analysis.spectra import SpectralCache
from analysis.taskvectors import TaskVectorSet
from ui import serverlog, shutdown

WORKSPACE_KEY = "workspace"

shutdown.install()   # `streamlit run` only: a SIGTERM never aborts a page busy in torch (ui/shutdown.py)
serverlog.install()  # `streamlit run` only: the engine's computations and fallbacks in the server's log


@dataclass(eq=False)
class Workspace:
    name: str                       # "demo" or a label for the user's own set
    tvs: TaskVectorSet
    evaluator: Any = None           # analysis.evaluation.Evaluator when labelled data exists
    reference: pd.DataFrame | None = None  # zero-shot / fine-tuned metrics, when known
    extras: dict = field(default_factory=dict)
    recipe: dict | None = None      # how to reopen it from disk (ui/workspaces.py); the URL carries it

    @property
    def key(self) -> str:
        """Identifies the workspace for st.cache_*: its set and its evaluator, each by a token stamped on
        the object once (not id(), which a later object can reuse after this one is freed and then be
        served this one's results). Sessions that open the same cached set with the same data share the
        key, and so the merges and scores; the same set scored on other data does not."""
        return ":".join([self.name] + [_token(obj) for obj in (self.tvs, self.evaluator) if obj is not None])


def _token(obj) -> str:
    token = getattr(obj, "_mergescope_token", None)
    if token is None:
        token = uuid.uuid4().hex[:12]
        obj._mergescope_token = token
    return token


def get_workspace() -> Workspace | None:
    return st.session_state.get(WORKSPACE_KEY)


def set_workspace(ws: Workspace) -> None:
    """Make `ws` the session's workspace; its recipe replaces the URL's (none: the URL names no workspace)."""
    from ui.workspaces import write_recipe
    st.session_state[WORKSPACE_KEY] = ws
    write_recipe(ws.recipe)


def require_workspace() -> Workspace:
    from ui.workspaces import PROBLEM_KEY
    ws = get_workspace()
    problem = st.session_state.get(PROBLEM_KEY)
    if ws is None:
        if problem:
            st.warning(f"This link's workspace cannot be opened here: {problem}.")
        else:
            st.info("No task-vector set is loaded yet. Open **Home** and load the built-in demo or your own "
                    "checkpoints.")
        st.stop()
    if problem:
        st.warning(f"This link's workspace cannot be opened here ({problem}); showing the loaded set "
                   f"**{ws.name}** instead.")
    return ws


@st.cache_resource(show_spinner=False)
def merge_inputs(_ws: Workspace, key: str) -> MergeInputs:
    """The workspace's MergeInputs: spectra, data statistics and memos, shared by every page."""
    return MergeInputs(_ws.tvs, _ws.evaluator)


def reachable_rank_fraction(cache: SpectralCache) -> float:
    """The largest rank fraction a slider may offer over `cache`: 1.0 when every direction is kept, else the
    smallest K/k over its matrices, rounded down to the sliders' 0.01 step (analysis.spectra: keep)."""
    if cache.keeps_everything:
        return 1.0
    return max(0.01, int(100 * min(cache.max_rank_fraction(n) for n in cache.names) + 1e-9) / 100)


def kept_directions_caption(cache: SpectralCache, hi: float) -> str | None:
    """Why a rank-fraction slider stops short of 1 (None when it does not)."""
    if hi >= 1.0:
        return None
    return (f"This set's spectral cache keeps only the top singular directions of its large matrices "
            f"(keep={cache.keep!r}), so rank fractions go up to {hi:.2f}; singular values are kept in full. "
            "Set MERGESCOPE_SPECTRA_KEEP=full (or a larger fraction) before starting the app to reach more.")


def rank_fraction_slider(cache: SpectralCache, *, key: str, param: str, help: str) -> float:
    """The 'rank fraction kept per task' slider over `cache`, default 1/T, capped at what the cache keeps
    (with a caption saying why when the cap is below 1)."""
    from ui import url
    hi = reachable_rank_fraction(cache)
    f = url.widget(st.slider, "Rank fraction kept per task (of min(m, n))", key=key, param=param,
                   default=min(round(1.0 / max(len(cache.tasks), 1), 2), hi), min_value=0.01, max_value=hi,
                   step=0.01, help=help)
    if (note := kept_directions_caption(cache, hi)):
        st.caption(note)
    return f


@st.cache_data(max_entries=16, show_spinner="Scoring the references on the same examples…")
def references(_ws: Workspace, ws_key: str, split: str, subsample: int | None):
    """Zero-shot and fine-tuned on the examples a merged model was scored on (`subsample` per task, the
    evaluator's seeded choice; the full split: the workspace's table). Merge and Report compare with these."""
    if subsample is None and _ws.reference is not None:
        return _ws.reference
    return references_on_examples(_ws, split, subsample)


def references_on_examples(ws: Workspace, split: str, subsample: int | None, stop=None):
    """`analysis.merging.scoring.reference_on_examples`, kept in the workspace per (split, subsample): they do
    not depend on the merge, so a page's background refinement (ui.refine) scores them once, not on every
    slider move (they were 2/3 of each refinement's forward passes: zero-shot and fine-tuned against one
    merged model). Callable from a refinement's thread (no Streamlit call)."""
    memo = ws.extras.setdefault("references_on_examples", {})
    key = (split, subsample)
    if key not in memo:
        from analysis.merging.scoring import reference_on_examples
        memo[key] = reference_on_examples(ws.evaluator, ws.tvs, split, subsample, stop=stop)
    return memo[key]


@st.cache_resource(show_spinner=False)   # the bar says it (a spinner beside it squeezed its text)
def spectral_cache(_ws: Workspace, key: str, include_embeddings: bool = False) -> SpectralCache:
    # compute (or load from disk) every factor now, under the bar, not on a slider move; on Ray the bar
    # names the cluster (SpectralCache._compute_on_ray)
    inputs = merge_inputs(_ws, key)
    with with_progress(inputs, "Per-layer SVDs (once per set, cached on disk)", eager=True):
        return inputs.spectra(include_embeddings).compute()


def distributed_label() -> str | None:
    """The sidebar's line when $MERGESCOPE_DISTRIBUTED asks for Ray (None when off); a bad value is shown, not raised."""
    from analysis import distributed
    try:
        if distributed.backend() != "ray":
            return None
    except MergescopeError as exc:
        return f"**Distributed:** {exc}"
    where = os.environ.get("RAY_ADDRESS") or "a local Ray on this machine"
    return f"**Distributed:** per-layer SVDs run as Ray tasks on {where} (${distributed.ENV_VAR}=ray)"


@contextlib.contextmanager
def _unrecorded():
    """Streamlit elements made here are not recorded by an enclosing `st.cache_*` function.

    Streamlit records every element a cached function draws and replays it on
    each cache hit; a replayed progress bar is never emptied, so it stayed on
    the page (and kept the page 'busy' for the browser tests) after a merge or
    the Curvature statistics had been cached."""
    try:
        from streamlit.runtime.scriptrunner_utils.script_run_context import in_cached_function
    except ImportError:   # another Streamlit layout: recorded as before
        yield
        return
    token = in_cached_function.set(False)
    try:
        yield
    finally:
        in_cached_function.reset(token)


@contextlib.contextmanager
def with_progress(inputs: MergeInputs, label: str, eager: bool = False):
    """While inside, a progress bar shows whenever `inputs` computes statistics or spectra
    (`eager`: from the start, for a block that only runs when there is work).

    The bar is drawn live even from inside a cached function, and never replayed."""
    widget = None
    if eager:
        with _unrecorded():
            widget = st.progress(0.0, text=f"{label} · starting…")

    def report(done, total, what):
        nonlocal widget
        with _unrecorded():
            if widget is None:
                widget = st.progress(0.0, text=label)
            widget.progress(min(1.0, done / max(1, total)), text=f"{label} · {what} ({done}/{total})")
    previous, inputs.progress = inputs.progress, report
    try:
        yield
    finally:
        inputs.progress = previous
        if widget is not None:
            with _unrecorded():
                widget.empty()


# ---------------------------------------------------------------- shared page furniture


@st.cache_resource(show_spinner=False)
def device_summary() -> dict:
    from analysis.device import device_info
    try:
        return device_info()
    except Exception as exc:  # a bad MERGESCOPE_DEVICE must not break every page
        return {"device": "?", "type": "?", "name": f"unavailable: {exc}", "memory_gib": None}


def device_label(info: dict | None = None) -> str:
    info = info or device_summary()
    if info.get("type") == "cuda":
        return f"GPU · {info['name']} · {info['memory_gib']} GiB"
    if info.get("type") == "mps":
        return "Apple GPU (MPS)"
    threads = info.get("cpu_threads")
    return f"CPU{f' · {threads} threads' if threads else ''} (no GPU found)"


def start_page(name: str, title: str | None = None) -> None:
    """The preamble every page shares: browser-tab title, wide layout, sidebar status, heading."""
    from ui import collector, presence
    from ui.workspaces import sync_workspace
    st.set_page_config(page_title=f"mergescope · {name}", layout="wide")
    presence.mark(st.session_state)   # who uses the server (ui/presence.py)
    sync_workspace()   # a link's workspace is opened here, and the session's is written to the URL
    collector.freeze_long_lived()   # Streamlit's collection after each run then skips modules and workspaces
    sidebar_status()
    st.title(title or name)


def sidebar_status() -> None:
    """Device, cache folder and the loaded set, in the sidebar of any page that calls it."""
    ws = get_workspace()
    with st.sidebar:
        st.caption(f"**Device:** {device_label()}")
        st.caption(f"**Caches:** `{cache_root()}`")
        if (ray_note := distributed_label()):
            st.caption(ray_note)
        if ws is not None:
            st.caption(f"**Loaded:** {ws.name} · {len(ws.tvs.tasks)} tasks")
            if ws.extras.get("restore_note"):
                st.caption(ws.extras["restore_note"])
