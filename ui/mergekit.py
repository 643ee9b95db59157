"""The "mergekit YAML" download of one configuration (the Report page's export section).

The YAML is analysis.mergekit.export_workspace_yaml's, in the base's dtype. Where there is none,
the page says why instead of offering a button: the refusal analysis.mergekit gives for a method
mergekit does not have (TSV-M, Iso-C/CTS, EpiMer, Fisher, RegMean, …) or for knobs it cannot
express, an iterative run (a trained model, not a recipe), or models with no path on disk."""
from __future__ import annotations

import re

import streamlit as st

from analysis.mergekit import MergekitError, export_workspace_yaml, paths_mergekit_cannot_read, source_dtype


def mergekit_download(tvs, cfg: dict) -> None:
    """A download button for `cfg` ({"method", "knobs"}, + "model_file" for an iterative run), or why not."""
    method, knobs = cfg["method"], dict(cfg.get("knobs") or {})
    if cfg.get("model_file"):
        st.info(f"**mergekit YAML**: not available for {method}: this is an iterative run, whose merged model "
                "was trained here; mergekit has no such procedure to write as a recipe.")
        return
    try:
        text = export_workspace_yaml(tvs, method, knobs, dtype=source_dtype(tvs))
    except MergekitError as exc:
        st.warning(f"**mergekit YAML**: not available: {exc}.")
        return
    name = "mergekit_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", method) + ".yaml"
    st.download_button("mergekit YAML", text.encode(), name, "application/x-yaml", key="rp_mergekit",
                       on_click="ignore",
                       help="A mergekit configuration of this merge over the set's checkpoints: "
                            "`mergekit-yaml " + name + " ./merged`.")
    unreadable = paths_mergekit_cannot_read(tvs)
    if unreadable:
        st.warning("mergekit loads Hugging Face model folders (with config.json) or Hub ids; edit these paths "
                   "in the YAML before running it: " +
                   ", ".join(f"{label} = `{path}`" for label, path in unreadable.items()))
    with st.expander("mergekit YAML"):
        st.code(text, language="yaml")
