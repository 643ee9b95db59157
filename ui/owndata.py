"""Home-page pieces for your own checkpoints: browser uploads, attaching data, and loading a
Hugging Face set with an Evaluator (analysis.ownset) into a Workspace."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from analysis.errors import ValidationError
from analysis.owndata import (SPLIT_RULE, UPLOAD_LIMIT_MB, read_task_data, resolve_data, save_upload,
                              upload_name)
from analysis.ownset import build_evaluation, is_hf_folder, open_hf_set
from ui.state import Workspace, cache_root

UPLOADS_KEY = "home_uploaded_checkpoints"
BASE_HINTS = ("base", "pretrained")


def upload_section() -> None:
    """Small checkpoints from the browser: saved under the cache's uploads/ folder, then put into the form."""
    with st.expander(f"Upload checkpoints from this browser (files up to {UPLOAD_LIMIT_MB} MB; give paths for "
                     "larger ones)"):
        st.caption("A single `.safetensors` file, or a Hugging Face folder as a `.zip` (config.json, weights, "
                   f"tokenizer). Uploads are kept in `{cache_root() / 'uploads'}`, never in your own folders. "
                   "An upload whose name contains 'base' or 'pretrained' becomes the base; the others become "
                   "tasks named after their files.")
        files = st.file_uploader("Checkpoints", type=["zip", "safetensors"], accept_multiple_files=True,
                                 key="home_ckpt_upload")
        saved = {}
        for f in files or []:
            try:
                path = save_upload(f.name, f.getvalue(), cache_root() / "uploads")
            except ValidationError as exc:
                st.error(str(exc))
                continue
            saved[upload_name(f.name)] = str(path)
        st.session_state[UPLOADS_KEY] = saved
        if saved:
            st.code("\n".join(f"{name} = {path}" for name, path in saved.items()), language="text")
            st.button("Put the uploads into the form", key="home_use_uploads", on_click=_fill_form, args=(saved,))


def _fill_form(saved: dict[str, str]) -> None:
    base = [n for n in saved if any(h in n.lower() for h in BASE_HINTS)]
    if base:
        st.session_state["home_base"] = saved[base[0]]
    lines = [l for l in st.session_state.get("home_tasks", "").splitlines() if l.strip()]
    lines += [f"{n} = {p}" for n, p in saved.items() if n not in base[:1]]
    st.session_state["home_tasks"] = "\n".join(dict.fromkeys(lines))


def data_widgets(prev: dict) -> tuple[str, list, int, int]:
    """Inside the load form: data lines or a folder, data uploads, split seed, max tokens."""
    data = st.text_area("Data (optional): one line per task `name = file or folder`, or one data folder holding "
                        "`<task>.csv` / `<task>.jsonl` / `<task>/`", value=prev.get("data", ""), key="home_data",
                        height=90, placeholder="sst2 = /data/sst2.csv\nmnli = /data/mnli/   (train/validation/test files)")
    uploads = st.file_uploader("…or upload data files named after their task (`sst2.csv`, `mnli.jsonl`)",
                               type=["csv", "jsonl"], accept_multiple_files=True, key="home_data_upload")
    c1, c2 = st.columns(2)
    seed = c1.number_input("Split seed", 0, 2**31 - 1, int(prev.get("seed", 0)), key="home_seed")
    max_len = c2.number_input("Tokens per text (longer texts are cut)", 8, 4096, int(prev.get("max_len", 128)),
                              step=8, key="home_max_len")
    st.caption("Columns: `text` and `label` (class name or index; names as in the checkpoint's config.json "
               "id2label), optional `split`. A file without `label` is unlabelled text: the Merge page then "
               "compares the merged model with each fine-tuned one without labels. " +
               SPLIT_RULE.format(seed=int(seed)))
    return data, list(uploads or []), int(seed), int(max_len)


def wants_own_models(base: str, pairs: list[tuple[str, str]]) -> bool:
    """Base and every task are Hugging Face folders: the set can be run, so data can be attached."""
    return is_hf_folder(base) and all(is_hf_folder(p) for _, p in pairs)


def data_paths(data_text: str, uploads: list, tasks: list[str]) -> dict[str, Path]:
    paths = resolve_data(data_text, tasks) if data_text.strip() else {}
    for f in uploads:
        task = Path(f.name).stem
        if task not in tasks:
            raise ValidationError(f"uploaded data file {f.name!r}: names no task of this set ({tasks}); name it "
                                  "<task>.csv or <task>.jsonl")
        if task in paths:
            raise ValidationError(f"task {task!r} has data both in the form ({paths[task]}) and as an upload")
        paths[task] = save_upload(f.name, f.getvalue(), cache_root() / "uploads")
    return paths


def load_own_workspace(base: str, pairs: list[tuple[str, str]], data: dict[str, Path], seed: int, max_len: int,
                       form: dict, exclude=()) -> Workspace:
    """Open the set, read its data, fit what needs fitting, score the references (with a progress bar)."""
    own = open_hf_set(base, dict(pairs), exclude)
    examples = {task: read_task_data(path) for task, path in data.items()}
    bar = st.progress(0.0, text="Preparing your data…")
    try:
        ev = build_evaluation(own, examples, seed=seed, max_length=max_len,
                              progress=lambda f, m: bar.progress(min(1.0, f), text=m))
    finally:
        bar.empty()
    own.tvs.keep_resident()
    heads = {**own.heads, **ev.heads}
    return Workspace(name=Path(base).name or "checkpoints", tvs=own.tvs, evaluator=ev.evaluator,
                     reference=ev.reference if len(ev.reference) else None,
                     extras={"form": form, "own": own, "own_cards": ev.cards, "hf_base": str(own.base),
                             "heads": heads, "labelfree": ev.labelfree, "split_rule": SPLIT_RULE.format(seed=seed),
                             "head_usage": ("logits = pooler_output @ W.T + b" if own.pooling == "pooler" else
                                            "logits = mean_pool(last_hidden_state) @ W.T + b")})


def own_summary(ws: Workspace) -> None:
    """Heads, data and splits of a user's Hugging Face set."""
    own = ws.extras.get("own")
    if own is None:
        return
    cards = ws.extras.get("own_cards", {})
    with st.expander("Your heads, data and splits", expanded=True):
        for t in own.tasks:
            card = cards.get(t, {})
            if card.get("labelled"):
                head = card["head"]
            elif t in own.heads:
                head = f"from the checkpoint: {own.head_keys[t][0].rsplit('.', 1)[0]} on the pooler output"
            else:
                head = f"none ({own.why_no_head[t]}); attach labelled data to fit a linear probe"
            st.markdown(f"- **{t}** — head: {head}  \n  data: {_card_text(card) if card else 'none attached'}")
        if any(c.get("labelled") for c in cards.values()):
            st.caption(ws.extras.get("split_rule", ""))
        if ws.evaluator is None:
            st.info("No labelled data attached: the Merge page shows label-free comparisons (agreement with each "
                    "fine-tuned model on your unlabelled text, and per-layer distances).")


def _card_text(card: dict) -> str:
    if not card.get("labelled"):
        return f"{card['texts']} unlabelled texts ({card['file']})"
    return f"{card['summary']} · split {card['split']} ({card['file']})"

