"""mergescope — home: choose a workspace (built-in demo or your own checkpoints).

Shows the device in use, where caches live, and a summary of the loaded set.
The loaded set is kept in st.session_state (ui.state), so it survives page
switches; heavy objects (task-vector sets, the demo) live in st.cache_resource.
"""
from __future__ import annotations

import re
import weakref
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.errors import MergescopeError, ValidationError
from analysis.merging.scoring import reference_accuracy
from analysis.report import set_summary
from ui import presence
from ui.jobs import BackgroundJob
from ui.owndata import data_paths, data_widgets, load_own_workspace, own_summary, upload_section, wants_own_models
from ui.state import Workspace, cache_root, device_label, device_summary, get_workspace, set_workspace, sidebar_status
from ui.workspaces import checkpoint_workspace, demo_workspace, own_data_recipe, sync_workspace

ASSETS = Path(__file__).parent / "assets"
DEMO, OWN = "Built-in demo", "Your checkpoints"
# Measured 2026-11-22 (docs/results_zoo.md): the current quick recipe took 13 min 52 s wall, 629 s CPU,
# single-threaded on this project's shared 2-core CPU.
QUICK_BUILD_NOTE = ("The quick CPU build fine-tunes the 6-layer MiniLM on 8 text tasks with short sequences and "
                    "trains 5 MNIST MLPs. Measured: about 14 minutes on a shared 2-core CPU (about 10 CPU-minutes); "
                    "a GPU is much faster. It writes about 0.8 GB to the cache folder. Then, for the Alignment "
                    "page, it trains 4 small BERT encoders from scratch (about 1 more minute on an idle 2-core CPU, "
                    "8 on a busy one; the demo opens before they are done).")

st.set_page_config(page_title="mergescope", page_icon=str(ASSETS / "logo.svg"), layout="wide")
presence.mark(st.session_state)   # who uses the server (ui/presence.py), as every page does
if (ASSETS / "logo.svg").is_file():
    st.logo(str(ASSETS / "logo.svg"))


# ---------------------------------------------------------------- loaders (cached, process-wide: ui/workspaces.py,
# shared with every page, which reopens a link's workspace through them)
@st.cache_resource(show_spinner=False)
def build_jobs() -> dict:
    """cache folder -> BackgroundJob; process-wide so a build runs once."""
    return {}


def parse_task_lines(text: str) -> list[tuple[str, str]]:
    """'name = path' per line; blank lines and lines starting with # are skipped."""
    pairs = []
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValidationError(f"task line {i} {line!r} is not of the form 'name = path'")
        name, path = (s.strip() for s in line.split("=", 1))
        if not name or not path:
            raise ValidationError(f"task line {i} {line!r} needs both a name and a path ('name = path')")
        pairs.append((name, path))
    if not pairs:
        raise ValidationError("no tasks given: add at least one line 'name = path' (a fine-tuned checkpoint "
                              "or a LoRA adapter folder)")
    return pairs


@st.cache_resource(show_spinner=False)
def summary_store() -> "weakref.WeakKeyDictionary":
    """Process-wide: task-vector set -> summary tables (dies with the set). Not st.cache_data because the
    computation draws a progress bar (elements made outside a cache_data function cannot be driven from inside)."""
    return weakref.WeakKeyDictionary()


def summarise(ws: Workspace) -> dict:
    """Summary tables, computed once per set (reads each tensor once) with a progress bar."""
    if "summary" not in ws.extras:
        store = summary_store()
        if ws.tvs not in store:
            bar = st.progress(0.0, text="Reading task vectors…")
            store[ws.tvs] = set_summary(ws.tvs, progress=lambda f, m: bar.progress(f, text=m))
            bar.empty()
        ws.extras["summary"] = store[ws.tvs]
    return {k: v.copy() for k, v in ws.extras["summary"].items()}


# ---------------------------------------------------------------- sections
def demo_section() -> None:
    try:
        from analysis.zoo import DemoNotBuilt, find_build
        from analysis.zoo.transformers import build_demo_and_transformer_zoo
    except ImportError:
        st.info("The built-in demo is not part of this installation yet. Use **Your checkpoints** instead.")
        return
    root = cache_root()
    job = build_jobs().get(str(root))
    if job is not None and job.running:
        try:
            find_build(root)   # the demo part is done; the transformer zoo is still training
        except DemoNotBuilt:
            show_build_progress(str(root))
            return
        fraction, message = job.state()
        st.caption(f"Still building in the background ({100 * fraction:.0f} %): {message}. The Alignment page's "
                   "transformer zoo appears when it is done.")
    if job is not None and job.error is not None:
        st.error(f"The demo build stopped: {job.error}")
        with st.expander("Details"):
            st.code(job.details)
    try:
        folder = find_build(root)
    except DemoNotBuilt:
        st.warning(f"The built-in demo is not built yet (looked in `{root}`).")
        st.write(QUICK_BUILD_NOTE + " It runs in the background: you can leave this page, and an interrupted "
                 "build never leaves a half-written model. From a terminal: `python -m analysis.zoo build --quick`.")
        if st.button("Build the quick demo now", type="primary", key="home_build"):
            build_jobs()[str(root)] = BackgroundJob(
                lambda report: build_demo_and_transformer_zoo("quick", root, progress=report)[0], "build-demo")
            st.rerun()
        return
    ws = get_workspace()
    if ws is not None and ws.name == "demo" and ws.extras.get("folder"):   # this build, or the one a link named
        st.success(f"Demo loaded from `{ws.extras['folder']}`.")
        return
    if ws is not None and ws.name != "demo":
        st.info(f"Your own set **{ws.name}** is loaded.")
        if not st.button("Switch to the demo", key="home_switch_demo"):
            return
    try:
        with st.spinner("Opening the demo (backbone, heads, encoded data)…"):
            new = demo_workspace(folder)
    except MergescopeError as exc:
        st.error(f"The demo in `{folder}` could not be opened: {exc}")
        return
    except Exception as exc:  # a damaged build folder: a message, never a traceback
        st.error(f"The demo in `{folder}` could not be opened ({type(exc).__name__}): {exc}. "
                 "Delete that folder and build again.")
        return
    set_workspace(new)
    st.success(f"Demo loaded from `{folder}`.")


def show_build_progress(root: str) -> None:
    @st.fragment(run_every=1.0)
    def poll():
        job = build_jobs().get(root)
        if job is None:
            return
        fraction, message = job.state()
        st.progress(fraction, text=f"{message} · {job.elapsed:.0f} s")
        if not job.running:
            st.rerun()
    st.info("Building the quick demo in the background; this page updates by itself.")
    poll()


def checkpoints_section() -> None:
    ws = get_workspace()
    prev = ws.extras.get("form", {}) if ws is not None and ws.name != "demo" else {}
    upload_section()
    with st.form("load_checkpoints"):
        base = st.text_input("Base (pretrained) model: a .safetensors / .bin / .pt file or a Hugging Face folder",
                             value=prev.get("base", ""), key="home_base", placeholder="/models/base")
        lines = st.text_area("Tasks, one per line as `name = path` (a full fine-tuned checkpoint or a PEFT LoRA "
                             "adapter folder)", value=prev.get("lines", ""), key="home_tasks", height=140,
                             placeholder="sst2 = /models/sst2\nmnli = /models/mnli-lora")
        exclude = st.text_input("Exclude parameters matching (regex; e.g. per-task heads that differ in shape)",
                                value=prev.get("exclude", ""), key="home_exclude", placeholder=r"^classifier\.")
        trust = st.checkbox("Trust pickled checkpoints (whole-module pickles run code when loaded: only for files "
                            "you made or trust)", value=prev.get("trust", False), key="home_trust")
        st.markdown("**Your data** — with Hugging Face folders for the base and every task, attach labelled "
                    "text per task: heads come from the checkpoints (`AutoModelForSequenceClassification`) or are "
                    "fitted as linear probes, and every page works as on the demo.")
        data_text, data_uploads, seed, max_len = data_widgets(prev)
        submitted = st.form_submit_button("Load", type="primary")
    if not submitted:
        return
    try:
        if not base.strip():
            raise ValidationError("no base model given: enter the path of the pretrained checkpoint")
        pairs = parse_task_lines(lines)
        patterns = (exclude.strip(),) if exclude.strip() else ()
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValidationError(f"the exclude pattern {p!r} is not a valid regular expression: {exc}") from exc
        form = {"base": base, "lines": lines, "exclude": exclude, "trust": trust, "data": data_text, "seed": seed,
                "max_len": max_len}
        new = None
        if wants_own_models(base.strip(), pairs):
            # runnable: task vectors over the AutoModel's names, heads from the checkpoints, data if given
            data = data_paths(data_text, data_uploads, [name for name, _ in pairs])
            try:
                with st.spinner("Opening checkpoints and checking keys, shapes and dtypes…"):
                    new = load_own_workspace(base.strip(), pairs, data, seed, max_len, form, patterns)
                new.recipe = own_data_recipe(base.strip(), pairs, patterns, data, seed, max_len)
            except MergescopeError as exc:
                if data:
                    raise
                # not runnable as an AutoModel set (e.g. a custom architecture): task vectors only
                st.caption(f"Loaded as task vectors only (no model to run): {exc}")
        if new is None:
            if data_text.strip() or data_uploads:
                raise ValidationError("attaching data needs Hugging Face folders (config.json + weights) for the "
                                      "base and every task, so the model can be run on your text")
            with st.spinner("Opening checkpoints and checking keys, shapes and dtypes…"):
                new = checkpoint_workspace(base.strip(), pairs, patterns, bool(trust), form=form)
        tvs = new.tvs
        summarise(new)  # reads every tensor once: NaN/Inf and truncated data show up here, not on a later page
    except MergescopeError as exc:
        st.error(f"Could not load the checkpoints: {exc}")
        return
    except Exception as exc:  # never a traceback in the page
        st.error(f"Could not load the checkpoints ({type(exc).__name__}): {exc}")
        return
    set_workspace(new)
    scored = f"; scored on labelled data for {len(new.evaluator.tasks)} task(s)" if new.evaluator is not None else ""
    st.success(f"Loaded {len(tvs.tasks)} task vectors over `{base.strip()}`{scored}.")


def summary_section(ws: Workspace) -> None:
    st.subheader(f"Loaded set: {ws.name}")
    try:
        tables = summarise(ws)
    except MergescopeError as exc:
        st.error(f"Could not read the set: {exc}")
        return
    kinds, tasks, layers = tables["kinds"], tables["tasks"], tables["layers"]
    c = st.columns(4)
    c[0].metric("tasks", len(ws.tvs.tasks))
    c[1].metric("parameter tensors", int(kinds["tensors"].sum()))
    c[2].metric("parameters (per model)", f"{int(kinds['parameters'].sum()):,}")
    c[3].metric("blocks", int(sum(d != "outside blocks" for d in layers["depth"])))
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Tasks** — L2 norm of each task vector ‖τ‖ and relative to the base ‖τ‖/‖θ₀‖")
        st.dataframe(tasks, hide_index=True, key="summary_tasks",
                     column_config={"l2_norm": st.column_config.NumberColumn("‖τ‖₂", format="%.4g"),
                                    "relative_norm": st.column_config.NumberColumn("‖τ‖/‖θ₀‖", format="%.3g")})
        st.markdown("**Parameters by kind**")
        st.dataframe(kinds, hide_index=True, key="summary_kinds")
    with right:
        st.markdown("**Tensors per layer (block index parsed from names)**")
        st.dataframe(layers, hide_index=True, key="summary_layers", height=min(420, 38 + 35 * len(layers)))
    if ws.reference is not None and len(ws.reference):
        splits = set(ws.reference["split"])
        split = "test" if "test" in splits else sorted(splits)[0]
        demo = ws.extras.get("demo")
        finished = getattr(demo, "manifest", {}).get("finished") if demo is not None else None
        st.markdown(f"**Reference accuracy (%), {split} split, every example of it** — frozen per-task heads on the "
                    "pretrained (zero-shot) and fine-tuned backbones" + (f", build finished {finished}" if finished else ""))
        table = (reference_accuracy(ws.reference, split) * 100).round(1)
        rows = ws.reference[(ws.reference["split"] == split) & (ws.reference["metric"] == "accuracy")]
        if "n" in rows:
            table["examples"] = rows.groupby("task")["n"].max().reindex(table.index)
        st.dataframe(table, key="summary_reference")
        if demo is not None:
            st.caption("The numbers of the build on disk. Fine-tuning on a CPU is not bit-reproducible (thread count; "
                       "dropout draws depend on what ran before in the build), so a rebuild of the same configuration "
                       "scores a little differently: see the README's quick-build table.")
    own_summary(ws)
    if "cards" in ws.extras:
        with st.expander("Data cards of the demo tasks"):
            demo = ws.extras.get("demo")
            st.dataframe(demo.cards_table() if demo is not None else pd.DataFrame(ws.extras["cards"]).T,
                         hide_index=True)


# ---------------------------------------------------------------- page
st.title("mergescope")
st.caption("Explore interference, tune merges interactively, and present the results — on the built-in "
           "benchmark or on your own checkpoints.")

problem = sync_workspace()   # a link's workspace (?ws=demo-quick, ?ws=own&ws_base=…) opens here too
if problem:
    st.warning(f"This link's workspace cannot be opened here: {problem}.")

info = device_summary()
c1, c2 = st.columns(2)
c1.markdown(f"**Device:** {device_label(info)} · torch {info.get('torch', '?')}")
c2.markdown(f"**Caches:** `{cache_root()}` (set `MERGESCOPE_CACHE` to move them)")

ws = get_workspace()
default = 1 if (ws is not None and ws.name != "demo") else 0
source = st.radio("Workspace", [DEMO, OWN], index=default, horizontal=True, key="home_source")
if source == DEMO:
    demo_section()
else:
    checkpoints_section()

ws = get_workspace()
if ws is not None:
    st.divider()
    summary_section(ws)
    st.caption("Next: **Spectra** and **Interference** to see where tasks fight, **Merge** to tune a method live, "
               "**Loss Landscape** for barriers, **Report** to export.")
sidebar_status()  # last, so it shows the set loaded in this run
