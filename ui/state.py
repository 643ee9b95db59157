"""The loaded workspace, kept in st.session_state so it survives page switches.

Tests inject a workspace with `AppTest.session_state["workspace"] = Workspace(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st

from analysis.spectra import SpectralCache
from analysis.taskvectors import TaskVectorSet

WORKSPACE_KEY = "workspace"


@dataclass(eq=False)
class Workspace:
    name: str                       # "demo" or a label for the user's own set
    tvs: TaskVectorSet
    evaluator: Any = None           # analysis.evaluation.Evaluator when labelled data exists
    reference: pd.DataFrame | None = None  # zero-shot / fine-tuned metrics, when known
    extras: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identifies the workspace for st.cache_* (object identity is per session)."""
        return f"{self.name}:{id(self.tvs)}"


def get_workspace() -> Workspace | None:
    return st.session_state.get(WORKSPACE_KEY)


def set_workspace(ws: Workspace) -> None:
    st.session_state[WORKSPACE_KEY] = ws


def require_workspace() -> Workspace:
    ws = get_workspace()
    if ws is None:
        st.info("No task-vector set is loaded yet. Open **Home** and load the built-in demo or your own checkpoints.")
        st.stop()
    return ws


@st.cache_resource(show_spinner="Computing per-layer SVDs (once per set)…")
def spectral_cache(_ws: Workspace, key: str, include_embeddings: bool = False) -> SpectralCache:
    cache = SpectralCache(_ws.tvs, include_embeddings=include_embeddings)
    for name in cache.names:  # compute (or load from disk) now, under the spinner
        cache.factors(name)
        break
    return cache
