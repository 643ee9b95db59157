"""The Report page's "merged model for transformers" section: one configuration tried on the Merge
page, written as a Hugging Face folder (analysis.report.write_hf_model) and, for a user's own
classification checkpoints, one AutoModelForSequenceClassification folder per task
(analysis.ownset.write_sequence_classification)."""
from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from analysis.errors import MergescopeError
from analysis.report import write_hf_model
from ui import url
from ui.endpoints import history_configs, registry
from ui.state import merge_inputs


def merged_model_section(ws, history, workspace_meta: dict) -> None:
    st.subheader("Merged model for transformers")
    tvs = ws.tvs
    configs = history_configs(history)
    base_folder = ws.extras.get("hf_base") or tvs.sources.get("base", "")
    base_dir = Path(base_folder) if base_folder and not str(base_folder).startswith("<") else None
    if base_dir is not None and base_dir.is_file():
        base_dir = base_dir.parent
    if not configs:
        st.info("Try a configuration on the **Merge** page to export its merged backbone.")
        return
    if base_dir is None or not (base_dir / "config.json").is_file():
        st.info("The merged backbone can be written as a Hugging Face folder when the base model is one "
                "(a folder with config.json); this set's base is not.")
        return
    own = ws.extras.get("own")
    label = url.widget(st.selectbox, "Configuration", key="rp_export_config", param="rp_export",
                       options=list(configs), default=list(configs)[-1])
    out = st.text_input("Output folder (on the machine running the app)",
                        value=str(Path(tempfile.gettempdir()) / "mergescope-merged"), key="rp_export_dir")
    per_task = False
    if own is not None and own.heads:
        per_task = st.checkbox(f"Also write one `AutoModelForSequenceClassification` folder per task with a "
                               f"checkpoint head ({len(own.heads)}: one copy of the backbone each)", value=True,
                               key="rp_export_per_task")
    if not st.button("Write merged model", key="rp_export"):
        return
    cfg = configs[label]
    _, merge = registry()
    try:
        if merge is None:
            raise MergescopeError("merging methods are not available in this installation")
        with st.spinner(f"Merging with {cfg['method']} and writing {out}…"):
            if cfg.get("model_file"):   # an iterative run: its saved model, not a registry merge
                from analysis.iterative import model_delta
                delta = model_delta(cfg["model_file"], tvs)
            else:
                delta = merge(merge_inputs(ws, ws.key), cfg["method"], **dict(cfg["knobs"]))
            state = tvs.apply(delta)
            folder = write_hf_model(out, state, base_dir, heads=ws.extras.get("heads"),
                                    metadata={**cfg, "workspace": workspace_meta},
                                    fill_from=ws.extras.get("hf_fill", ()),
                                    head_usage=ws.extras.get("head_usage",
                                                             "logits = mean_pool(last_hidden_state) @ W.T + b"))
            tasks = {}
            if per_task:
                from analysis.ownset import write_sequence_classification
                tasks = write_sequence_classification(folder / "sequence-classification", state, own)
    except MergescopeError as exc:
        st.error(f"Could not write the merged model: {exc}")
        return
    except OSError as exc:
        st.error(f"Could not write the merged model to {out}: {exc}")
        return
    meta = json.loads((folder / "mergescope.json").read_text())
    st.success(f"Wrote `{folder}`: config.json, model.safetensors, heads.safetensors, mergescope.json" +
               (f", and sequence-classification/ with {', '.join(tasks)}" if tasks else "") + ".")
    if meta.get("filled_from"):
        st.caption("Copied unchanged (not part of the merged backbone, so never trained): " +
                   ", ".join(f"`{k}` from `{v}`" for k, v in meta["filled_from"].items()))
    if meta.get("missing_on_load"):
        st.warning(f"`AutoModel.from_pretrained` will initialise {len(meta['missing_on_load'])} tensor(s) the "
                   f"merged backbone does not have (e.g. `{meta['missing_on_load'][0]}`): the base model was saved "
                   "without them. The heads in heads.safetensors do not use them.")
    code = f"from transformers import AutoModel\nmodel = AutoModel.from_pretrained({str(folder)!r})"
    if tasks:
        first = next(iter(tasks.values()))
        code += ("\n\nfrom transformers import AutoModelForSequenceClassification\n"
                 f"classifier = AutoModelForSequenceClassification.from_pretrained({str(first)!r})")
    st.code(code, language="python")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{folder.name}/{f.relative_to(folder)}")
    st.download_button("Download the folder (zip)", buf.getvalue(), f"{folder.name}.zip", "application/zip",
                       key="rp_zip", on_click="ignore")
