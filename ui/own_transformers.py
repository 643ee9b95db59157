"""The Alignment page's "Your own transformers" form: BERT folders from different seeds and a labelled
data file (analysis.permutation.own), kept in session state and in the URL, like the Home page's own
checkpoints (`ws_*`):

    al_own_model=/m/seed0&al_own_model=/m/seed1&al_own_data=/data/sst2.csv

A link with these parameters reopens the same source on any machine that has the folders.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from analysis.errors import MergescopeError, ValidationError
from analysis.owndata import save_upload
from ui import url
from ui.state import cache_root

KEY = "alignment_own_transformers"     # {"folders": [str, ...], "data": str}
MODEL_PARAM, DATA_PARAM = "al_own_model", "al_own_data"
MODEL_CHOICES = ("tr_a", "tr_b", "tr_merge")   # name the previous source's models: dropped when it changes


def request() -> dict | None:
    """The session's own-transformer request, else the URL's; written back to the URL."""
    req = st.session_state.get(KEY)
    qp = st.query_params
    if req is None and MODEL_PARAM in qp:
        req = {"folders": [f for f in qp.get_all(MODEL_PARAM) if f.strip()], "data": qp.get(DATA_PARAM, "")}
        st.session_state[KEY] = req
    if req:
        url.set_param(MODEL_PARAM, list(req["folders"]))
        url.set_param(DATA_PARAM, req["data"])
    return req


def _forget_choices() -> None:
    for key in MODEL_CHOICES:
        st.session_state.pop(key, None)


def _clear() -> None:
    st.session_state.pop(KEY, None)
    _forget_choices()
    url.drop(MODEL_PARAM, DATA_PARAM)


def form(req: dict | None) -> None:
    """The form; on submit the request goes into session state and the URL (read back by `request` next run)."""
    with st.expander("Your own transformers", expanded=bool(req)):
        st.caption("Hugging Face folders of one BERT architecture trained from different seeds (what "
                   "`save_pretrained` writes for `BertForSequenceClassification` or `BertModel`: config.json, "
                   "weights and, in at least one folder, the tokenizer), one per line, and a labelled CSV or JSONL "
                   "file (`text`, `label`, optional `split`). Heads: the checkpoints' classifier on the pooler when "
                   "the labels are its classes (config.json id2label names or indices), else a linear probe per "
                   "model on its mean-pooled last hidden states, fitted on the training split. Nothing is written "
                   "into your folders; an uploaded data file is kept under the cache's uploads/ folder.")
        st.session_state.setdefault("al_own_folders", "\n".join(req["folders"]) if req else "")
        st.session_state.setdefault("al_own_data_path", req["data"] if req else "")
        with st.form("al_own_form"):
            folders = st.text_area("Model folders, one per line", key="al_own_folders", height=90,
                                   placeholder="/models/bert-seed0\n/models/bert-seed1")
            data = st.text_input("Data file (or a folder of train / validation / test files)", key="al_own_data_path",
                                 placeholder="/data/sst2.csv")
            upload = st.file_uploader("…or upload the data file", type=["csv", "jsonl"], key="al_own_upload")
            submitted = st.form_submit_button("Align these transformers")
        if req:
            st.button("Back to the transformer zoo", key="al_own_clear", on_click=_clear)
    if submitted:
        paths = [line.strip() for line in folders.splitlines() if line.strip()]
        try:
            if upload is not None:
                data = str(save_upload(upload.name, upload.getvalue(), cache_root() / "uploads"))
            if not paths or not data.strip():
                raise ValidationError("give at least two model folders and a data file")
        except MergescopeError as exc:
            st.error(str(exc))
            return
        st.session_state[KEY] = {"folders": paths, "data": data.strip()}
        _forget_choices()
        st.rerun()


@st.cache_resource(show_spinner="Reading your transformers and data (probes are fitted when needed)…", max_entries=2)
def _open(folders: tuple[str, ...], data: str, stamp: tuple) -> dict:
    from analysis.permutation.own import open_own_transformers
    return open_own_transformers(list(folders), data)


def load(req: dict) -> tuple[dict, str]:
    """(transformer source, cache key); MergescopeError names the folder or file at fault."""
    from analysis.permutation.own import source_stamp
    folders = tuple(str(Path(f).expanduser()) for f in req["folders"])
    stamp = source_stamp(folders, req["data"])
    return _open(folders, req["data"], stamp), f"own:{folders}:{req['data']}:{stamp}"
