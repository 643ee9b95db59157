"""The Report page's "Export a configuration" section, for one configuration tried on the Merge page:
- a mergekit YAML of it (analysis.mergekit.export_workspace_yaml), or the reason there is none (a method
  mergekit does not have, models with no path on disk);
- the merged model as a Hugging Face folder (analysis.report.write_hf_model: sharded safetensors in the
  source dtype, streamed from the merge one shard at a time) and, for a user's own classification
  checkpoints, one AutoModelForSequenceClassification folder per task
  (analysis.ownset.write_sequence_classification)."""
from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from analysis.errors import MergescopeError
from analysis.report import merged_model, write_hf_model
from analysis.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from ui import url
from ui.endpoints import history_configs, registry
from ui.state import merge_inputs

ZIP_LIMIT = 512 * 2 ** 20   # a larger folder is not zipped in memory for the browser: copy it on the machine


def merged_model_section(ws, history, workspace_meta: dict) -> None:
    st.subheader("Export a configuration")
    tvs = ws.tvs
    configs = history_configs(history)
    if not configs:
        st.info("Try a configuration on the **Merge** page to export it as a mergekit YAML or a merged model.")
        return
    label = url.widget(st.selectbox, "Configuration", key="rp_export_config", param="rp_export",
                       options=list(configs), default=list(configs)[-1])
    cfg = configs[label]
    from ui.mergekit import mergekit_download
    mergekit_download(tvs, cfg)

    st.markdown("**Merged model for transformers**")
    base_folder = ws.extras.get("hf_base") or tvs.sources.get("base", "")
    base_dir = Path(base_folder) if base_folder and not str(base_folder).startswith("<") else None
    if base_dir is not None and base_dir.is_file():
        base_dir = base_dir.parent
    if base_dir is None or not (base_dir / "config.json").is_file():
        st.info("The merged backbone can be written as a Hugging Face folder when the base model is one "
                "(a folder with config.json); this set's base is not.")
        return
    own = ws.extras.get("own")
    c1, c2 = st.columns([3, 1])
    out = c1.text_input("Output folder (on the machine running the app)",
                        value=str(Path(tempfile.gettempdir()) / "mergescope-merged"), key="rp_export_dir")
    shard_size = c2.text_input("Max shard size", value=DEFAULT_MAX_SHARD_SIZE, key="rp_export_shard",
                               help="Weights are written as safetensors shards of at most this size with a "
                                    "model.safetensors.index.json (transformers' layout), in the base's dtype; "
                                    "one model.safetensors when they fit in one. Bytes, or e.g. 5GB, 500MB, 2GiB.")
    per_task = False
    if own is not None and own.heads:
        per_task = st.checkbox(f"Also write one `AutoModelForSequenceClassification` folder per task with a "
                               f"checkpoint head ({len(own.heads)}: one copy of the backbone each)", value=True,
                               key="rp_export_per_task")
    if not st.button("Write merged model", key="rp_export"):
        return
    methods, merge = registry()
    tasks = {}

    def classifiers(folder: Path) -> None:
        """Per-task classifier folders, from the backbone just written (read back: nothing kept resident)."""
        from analysis.checkpoints import open_checkpoint
        from analysis.ownset import write_sequence_classification
        written = open_checkpoint(folder)
        state = {k: written.get(k) for k in tvs.base.keys()}
        tasks.update({t: out_path / "sequence-classification" / t for t in
                      write_sequence_classification(folder / "sequence-classification", state, own)})

    try:
        limit = parse_size(shard_size)
        if merge is None:
            raise MergescopeError("merging methods are not available in this installation")
        out_path = Path(out).expanduser().resolve()
        if cfg.get("model_file"):   # an iterative run: its saved model, not a registry merge
            from analysis.iterative import model_delta
            stream = merged_model(tvs, model_delta(cfg["model_file"], tvs))
        else:
            spec = methods.get(cfg["method"])
            if spec is not None and spec.per_task:
                raise MergescopeError(f"{cfg['method']} gives one model per task, not one merged model; it has no "
                                      "single merged model to write")
            inputs = merge_inputs(ws, ws.key)
            stream = merged_model(tvs, merge_into=lambda sink: merge(inputs, cfg["method"], sink=sink,
                                                                     **dict(cfg["knobs"])))
        with st.spinner(f"Merging with {cfg['method']} and writing {out}…"):
            folder = write_hf_model(out, stream, base_dir, heads=ws.extras.get("heads"),
                                    metadata={**cfg, "workspace": workspace_meta},
                                    fill_from=ws.extras.get("hf_fill", ()),
                                    head_usage=ws.extras.get("head_usage",
                                                             "logits = mean_pool(last_hidden_state) @ W.T + b"),
                                    max_shard_size=limit, protect=list(tvs.sources.values()),
                                    also=classifiers if per_task else None)
    except MergescopeError as exc:
        st.error(f"Could not write the merged model: {exc}")
        return
    except OSError as exc:
        st.error(f"Could not write the merged model to {out}: {exc}")
        return
    meta = json.loads((folder / "mergescope.json").read_text())
    weights = meta["weights"]
    weights_text = (f"{len(weights) - 1} shards (`{weights[0]}` …) with `{weights[-1]}`" if len(weights) > 1
                    else f"`{weights[0]}`")
    st.success(f"Wrote `{folder}`: config.json, {weights_text} ({meta['total_size'] / 1e6:,.1f} MB of weights), "
               + ("heads.safetensors, " if (folder / "heads.safetensors").is_file() else "") + "mergescope.json" +
               (f", and sequence-classification/ with {', '.join(tasks)}" if tasks else "") + ".")
    if meta.get("filled_from"):
        st.caption("Copied unchanged (not part of the merged backbone, so never trained): " +
                   ", ".join(f"`{k}` from `{v}`" for k, v in meta["filled_from"].items()))
    if meta.get("missing_on_load"):
        st.warning(f"`AutoModel.from_pretrained` will initialise {len(meta['missing_on_load'])} tensor(s) the "
                   f"merged backbone does not have (e.g. `{meta['missing_on_load'][0]}`): the base model was saved "
                   "without them. The heads in heads.safetensors do not use them.")
    auto = "AutoModelForCausalLM" if any(str(a).endswith("ForCausalLM") for a in json.loads(
        (folder / "config.json").read_text()).get("architectures") or ()) else "AutoModel"
    code = f"from transformers import {auto}\nmodel = {auto}.from_pretrained({str(folder)!r})"
    if tasks:
        first = next(iter(tasks.values()))
        code += ("\n\nfrom transformers import AutoModelForSequenceClassification\n"
                 f"classifier = AutoModelForSequenceClassification.from_pretrained({str(first)!r})")
    st.code(code, language="python")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    if size > ZIP_LIMIT:
        st.caption(f"The folder holds {size / 1e9:,.2f} GB: too large to zip for the browser; copy `{folder}` "
                   "from the machine running the app.")
        return
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{folder.name}/{f.relative_to(folder)}")
    st.download_button("Download the folder (zip)", buf.getvalue(), f"{folder.name}.zip", "application/zip",
                       key="rp_zip", on_click="ignore")
