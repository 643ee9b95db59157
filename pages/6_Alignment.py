"""Alignment: models trained from different seeds, aligned by permuting their
hidden units (weight matching, C2M3), optionally REPAIRed; the interpolation
barrier they remove, the loss plane through three models, and N-model merges.

Models: the built-in demo's MNIST MLPs, or whatever a caller put in
st.session_state["alignment_models"] = {"models": {name: state_dict},
"train_x": Tensor, "test": (x, y), "label": str} (tests inject tiny ones); without them the
transformer section still runs. Transformers: st.session_state["alignment_transformers"] (tests), else
your own BERT folders + data (ui/own_transformers.py: the form, `al_own_*` in the URL), else the zoo.
Choices live in the URL (al_*, lat_* and tr_* query parameters, ui/url.py).
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.barriers import BARRIERS, barrier_labels
from analysis.errors import MergescopeError
from analysis.permutation import c2m3, mlp_spec_from_state_dict
from analysis.permutation.mlp import MLPEvaluator
from analysis.permutation.pipeline import aligned_planes, align_to_first, compare_paths, cycle_errors, merge_models
from analysis.plots.alignment import interpolation_figure, plane_figure
from ui import own_transformers, url
from ui.state import get_workspace, start_page

start_page("Alignment", "Permutation alignment")
st.caption("Models from different random seeds differ by a permutation of their hidden units. Align them "
           "(weight matching / C2M3), optionally renormalise (REPAIR), and watch the loss barrier between them "
           "shrink. Linear assignments run on the CPU (scipy); everything else on the app's device.")

METHODS = {"none": "none (naive)", "weight_matching": "weight matching (Git Re-Basin)", "c2m3": "C2M3"}


@st.cache_resource(show_spinner="Loading the demo's MLPs…")
def demo_models(paths: tuple[str, ...]) -> dict:
    from safetensors.torch import load_file

    from analysis.zoo.mnist import load_dataset
    models = {f"seed {p.split('_')[-1].split('.')[0]}": load_file(p) for p in paths}
    first = next(iter(models.values()))
    dataset = "mnist" if first["layers.0.weight"].shape[1] == 784 else "digits"
    x_train, _ = load_dataset(dataset, "train")
    return {"models": models, "train_x": x_train, "test": load_dataset(dataset, "test"),
            "label": f"built-in demo ({dataset} MLPs)"}


def load_source() -> tuple[dict | None, str | None]:
    injected = st.session_state.get("alignment_models")
    if injected:
        return injected, f"injected:{id(injected)}"
    try:
        from analysis.zoo import DemoNotBuilt, mnist_model_paths
        paths = tuple(str(p) for p in mnist_model_paths())
    except ImportError:
        st.info("The built-in benchmark package is not available in this install.")
        return None, None
    except DemoNotBuilt:
        st.info("**Build the demo first.** This page aligns the built-in benchmark's MNIST MLPs, and no build was "
                "found. Open **Home** and build the demo (or run `python -m analysis.zoo build --quick`). Your own "
                "transformers can be aligned below without it.")
        return None, None
    if len(paths) < 2:
        st.info("The built demo has fewer than two MLPs; rebuild it to get models from several seeds.")
        return None, None
    return demo_models(paths), "demo:" + ",".join(paths)


src, src_key = load_source()
if src is not None:   # without MLPs the transformer section below still works
    names = list(src["models"])
    st.caption(f"Models: {src.get('label', 'injected')} — {len(names)} seeds.")
    loaded = get_workspace()
    if loaded is not None and loaded.name != "demo" and not st.session_state.get("alignment_models"):
        st.info(f"This page always shows the **built-in demo's MNIST MLPs**, not your loaded set **{loaded.name}**: "
                "permutation alignment needs models trained from different random seeds of one MLP architecture "
                "(`layers.<i>.weight`), while a task-vector set holds fine-tuned copies of one pretrained model, "
                "which share their units already and need no alignment.")


def eval_fn_for(n_eval: int):
    x, y = src["test"]
    return MLPEvaluator(x[:n_eval], y[:n_eval])


@st.cache_data(show_spinner="Aligning…", max_entries=32)
def aligned_to(key: str, a: str, b: str, method: str) -> dict:
    """B in A's unit order: a change of the path's points or evaluation sizes does not re-align
    (weight matching was half of such a rerun)."""
    m = src["models"]
    return align_to_first([m[a], m[b]], mlp_spec_from_state_dict(m[a]), method)[1]


@st.cache_data(show_spinner="Interpolating…", max_entries=32)
def paths_table(key: str, a: str, b: str, method: str, use_repair: bool, n_lam: int, n_eval: int, n_rep: int):
    m = src["models"]
    lams = [i / (n_lam - 1) for i in range(n_lam)]
    return compare_paths(m[a], m[b], mlp_spec_from_state_dict(m[a]), eval_fn_for(n_eval), lams, method,
                         repair_x=src["train_x"][:n_rep] if use_repair else None,
                         b_aligned=aligned_to(key, a, b, method))


@st.cache_data(show_spinner="Evaluating the loss plane…", max_entries=16)
def planes(key: str, trio: tuple[str, str, str], method: str, resolution: int, n_eval: int):
    m = src["models"]
    sds = [m[k] for k in trio]
    return aligned_planes(sds, mlp_spec_from_state_dict(sds[0]), method, eval_fn_for(n_eval), resolution,
                          names=("A", "B", "C"))


@st.cache_data(show_spinner="Merging…", max_entries=32)
def merges(key: str, chosen: tuple[str, ...], method: str, use_repair: bool, n_eval: int, n_rep: int):
    m = src["models"]
    sds = [m[k] for k in chosen]
    spec = mlp_spec_from_state_dict(sds[0])
    ev = eval_fn_for(n_eval)
    rows = [{"model": k, **ev(m[k])} for k in chosen]
    # one C2M3 run serves the merge and the cycle error
    res = c2m3(sds, spec) if method == "c2m3" or len(sds) >= 3 else None
    merged = merge_models(sds, spec, method, repair_x=src["train_x"][:n_rep] if use_repair else None, c2m3_result=res)
    rows.append({"model": f"merge of {len(sds)}: {METHODS[method]}{' + REPAIR' if use_repair else ''}",
                 **ev(merged)})
    cyc = cycle_errors(sds, spec, c2m3_result=res) if len(sds) >= 3 else None
    return pd.DataFrame(rows), cyc


if src is not None:   # without MLPs the transformer section below still works
    with st.sidebar:
        st.subheader("Alignment")
        method = url.widget(st.radio, "Method", key="al_method", options=list(METHODS), default="weight_matching",
                            format_func=METHODS.get)
        use_repair = url.widget(st.checkbox, "REPAIR (renormalise hidden units)", key="al_repair", default=False)
        n_test = len(src["test"][1])
        n_eval = url.widget(st.slider, "Test examples evaluated", key="al_n_eval", default=min(2000, n_test),
                            min_value=min(100, n_test), max_value=n_test, step=50)
        n_rep = min(2000, len(src["train_x"]))

    path_tab, plane_tab, merge_tab = st.tabs(["Path between two models", "Plane through three models",
                                              "Merge N models"])
    try:
        with path_tab:
            c1, c2, c3 = st.columns(3)
            a = url.widget(c1.selectbox, "Model A", key="al_a", options=names, default=names[0])
            b = url.widget(c2.selectbox, "Model B", key="al_b", options=names, default=names[min(1, len(names) - 1)])
            n_lam = url.widget(c3.slider, "Points on the path", key="al_lam", default=11, min_value=3, max_value=21,
                               step=2)
            if a == b:
                st.warning("Pick two different models.")
            else:
                curves, bars = paths_table(src_key, a, b, method, use_repair, n_lam, n_eval, n_rep)
                f1, f2 = st.columns(2)
                f1.plotly_chart(interpolation_figure(curves, "loss"), width="stretch")
                f2.plotly_chart(interpolation_figure(curves, "accuracy", title="Test accuracy along the path A → B"),
                                width="stretch")
                st.markdown("**Barriers** (the same two definitions, by the same names, as on the Loss Landscape page)")
                for bdef in BARRIERS.values():
                    st.latex(rf"\text{{{bdef.label}:}}\quad {bdef.latex}")
                st.caption("For accuracy: the dip below the ends, in percentage points. Loss in nats.")
                shown = bars.rename(columns=barrier_labels())
                is_acc = shown["metric"] == "accuracy"
                for label in barrier_labels().values():
                    shown.loc[is_acc, label] = shown.loc[is_acc, label] * 100
                st.dataframe(shown.round(4), hide_index=True, width="stretch")

        with plane_tab:
            if len(names) < 3:
                st.info("The plane needs three models.")
            else:
                c1, c2, c3, c4 = st.columns(4)
                corners = [(c1, "A", "al_pa"), (c2, "B", "al_pb"), (c3, "C", "al_pc")]
                trio = tuple(url.widget(c.selectbox, label, key=key, options=names, default=names[i])
                             for i, (c, label, key) in enumerate(corners))
                resolution = url.widget(c4.slider, "Grid points per side", key="al_res", default=7, min_value=5,
                                        max_value=21, step=2)
                if len(set(trio)) < 3:
                    st.warning("Pick three different models.")
                elif url.widget(st.toggle, "Compute the plane", key="al_plane_on", default=False,
                                help=f"{resolution}² evaluations per panel"):
                    pl = planes(src_key, trio, method, resolution, n_eval)
                    st.plotly_chart(plane_figure(pl, "loss"), width="stretch")

        with merge_tab:
            chosen = url.widget(st.multiselect, "Models to merge", key="al_merge", options=names,
                                default=names[: min(3, len(names))])
            if len(chosen) < 2:
                st.info("Choose at least two models.")
            elif url.widget(st.toggle, "Compute the merge", key="al_merge_on", default=False,
                            help="C2M3 on MNIST-sized MLPs takes minutes on a CPU; the result is cached"):
                table, cyc = merges(src_key, tuple(chosen), method, use_repair, n_eval, n_rep)
                st.dataframe(table.assign(accuracy=table["accuracy"] * 100), hide_index=True, width="stretch",
                             column_config={"accuracy": st.column_config.NumberColumn("accuracy (%)", format="%.2f %%"),
                                            "loss": st.column_config.NumberColumn("loss (nats)", format="%.4f")})
                if cyc is not None:
                    st.markdown(f"**Cycle error** around {' → '.join(chosen)} → {chosen[0]}: fraction of hidden "
                                "units that do not come back to themselves (0 = cycle-consistent).")
                    st.dataframe(cyc.pivot(index="method", columns="group", values="value"), width="stretch")
    except MergescopeError as e:
        st.error(str(e))


# ---- latent spaces of the MLPs above (issue 15) ----------------------------------------------------
from analysis.permutation.mlp import mlp_layer_features  # noqa: E402
from analysis.permutation.pipeline import MLP as MLP_FAMILY  # noqa: E402
from analysis.permutation.views import (latent_view, transformer_aggregation, transformer_layer_fn,  # noqa: E402
                                        transformer_merges, transformer_paths, transformer_setup, pooled_inputs)
from analysis.plots.latent import aggregation_figure, layer_similarity_figure  # noqa: E402

LATENT_CAPTION = ("*Linear CKA* and *relative similarity* (cosine similarities to fixed anchor samples, Moschella et "
                  "al. 2023) do not change when units are permuted, so alignment leaves them equal for B vs A; the "
                  "*mean unit correlation* is what alignment raises. The merge rows compare a merge of A and B with A.")


@st.cache_data(show_spinner="Comparing latent spaces…", max_entries=16)
def mlp_latent(key: str, a: str, b: str, method: str, n_eval: int):
    m = src["models"]
    x = src["test"][0][:n_eval]
    return latent_view(mlp_layer_features, m, a, b, mlp_spec_from_state_dict(m[a]), method, x, MLP_FAMILY,
                       match_x=src["train_x"][:2000])


@st.cache_data(show_spinner="Training probes…", max_entries=16)
def mlp_aggregation(key: str, chosen: tuple[str, ...], n_eval: int, n_anchors: int):
    from analysis.latent import aggregation_table
    x, y = src["test"][0][:n_eval], src["test"][1][:n_eval]
    half = len(y) // 2
    feats = {k: list(mlp_layer_features(src["models"][k], x).values())[-2] for k in chosen}  # last hidden layer
    return aggregation_table({k: f[:half] for k, f in feats.items()}, y[:half],
                             {k: f[half:] for k, f in feats.items()}, y[half:], n_anchors=n_anchors)


if src is not None:   # without MLPs the transformer section below still works
    st.divider()
    st.header("Latent spaces")
    st.caption(LATENT_CAPTION)
    try:
        lc1, lc2, lc3 = st.columns(3)
        la = url.widget(lc1.selectbox, "Model A", key="lat_a", options=names, default=names[0])
        lb = url.widget(lc2.selectbox, "Model B", key="lat_b", options=names, default=names[min(1, len(names) - 1)])
        lmethod = url.widget(lc3.radio, "Alignment", key="lat_method",
                             options=["weight_matching", "activation_matching", "c2m3"], default="weight_matching",
                             format_func={"weight_matching": "weight matching", "activation_matching":
                                          "activation matching", "c2m3": "C2M3"}.get, horizontal=True)
        if la == lb:
            st.warning("Pick two different models.")
        elif url.widget(st.toggle, "Compare the latent spaces", key="lat_on", default=False):
            sim = mlp_latent(src_key, la, lb, lmethod, n_eval)
            st.plotly_chart(layer_similarity_figure(sim), width="stretch")
            st.dataframe(sim.pivot_table(index=["comparison", "measure"], columns="layer", values="value", sort=False),
                         width="stretch")
        agg_models = url.widget(st.multiselect, "Models whose relative spaces are aggregated", key="lat_agg",
                                options=names, default=names[:3])
        n_anchors = url.widget(st.slider, "Anchors", key="lat_anchors", default=50, min_value=10, max_value=200,
                               step=10)
        if len(agg_models) >= 2 and url.widget(st.toggle, "Train the probes", key="lat_agg_on", default=False,
                                               help="last hidden layer; probes trained on half of the evaluated "
                                                    "test examples, scored on the other half"):
            agg = mlp_aggregation(src_key, tuple(agg_models), n_eval, n_anchors)
            st.plotly_chart(aggregation_figure(agg), width="stretch")
            st.dataframe(agg, hide_index=True, width="stretch")
    except MergescopeError as e:
        st.error(str(e))


# ---- transformers from different seeds (issue 15) --------------------------------------------------
@st.cache_resource(show_spinner="Loading the transformer zoo…")
def zoo_source(root: str) -> dict:
    from analysis.zoo.transformers import open_transformer_zoo
    z = open_transformer_zoo(root)
    return {"models": z.models, "n_heads": z.n_heads, "eps": z.eps, "data": z.data,
            "label": f"transformer zoo ({z.manifest['kind']}, {len(z.models)} seeds)"}


def transformer_source():
    """(source, cache key): an injected one (tests), else your own (the form / URL), else the built zoo; (None,
    None) when there is none, or when your own cannot be opened (the error is shown)."""
    injected = st.session_state.get("alignment_transformers")
    if injected:
        return injected, f"injected:{id(injected)}"
    if own_req:
        try:
            return own_transformers.load(own_req)
        except MergescopeError as exc:
            st.error(f"Your own transformers could not be opened: {exc}")
            return None, None
    from analysis.zoo import DemoNotBuilt
    from analysis.zoo.transformers import find_transformer_zoo
    try:
        root = str(find_transformer_zoo())
    except DemoNotBuilt:
        return None, None
    return zoo_source(root), "zoo:" + root


T_METHODS = {"weight_matching": "weight matching", "activation_matching": "activation matching (correlations)"}


@st.cache_data(show_spinner="Aligning and interpolating the transformers…", max_entries=16)
def t_paths(key: str, a: str, b: str, method: str, use_rep: bool, n_lam: int):
    return transformer_paths(tsrc, a, b, method, use_rep, [i / (n_lam - 1) for i in range(n_lam)])


@st.cache_data(show_spinner="Merging the transformers…", max_entries=8)
def t_merges(key: str, chosen: tuple[str, ...], use_rep: bool):
    return transformer_merges(tsrc, chosen, use_rep)


@st.cache_data(show_spinner="Comparing latent spaces…", max_entries=8)
def t_latent(key: str, a: str, b: str, method: str):
    spec, fam = transformer_setup(tsrc)
    x = pooled_inputs(tsrc, "test", 100)
    return latent_view(transformer_layer_fn(tsrc), tsrc["models"], a, b, spec, method, x, fam,
                       match_x=pooled_inputs(tsrc, "train", 32))


@st.cache_data(show_spinner="Training probes per task…", max_entries=8)
def t_aggregation(key: str, chosen: tuple[str, ...], n_anchors: int):
    return transformer_aggregation(tsrc, chosen, n_anchors)


st.divider()
st.header("Transformers from different seeds")
own_req = own_transformers.request()
own_transformers.form(own_req)
st.caption("The built-in zoo: small BERT encoders trained from scratch on the text tasks, one per seed; or your own "
           "(above). Their permutation symmetry: "
           "one residual-stream permutation (embeddings, every LayerNorm, every block's input and output), one per "
           "FFN, and per attention a permutation of whole heads with permutations inside each head shared by Q and "
           "K, and by V and the output projection. REPAIR here renormalises every LayerNorm output and FFN "
           "pre-activation; a pooler's outputs (your own classifiers read them) are one more permutation. Scores: "
           "mean over tasks of each task head's test accuracy.")
tsrc, tkey = transformer_source()
if tsrc is None:
    if not own_req:   # else the error opening your own is shown above
        st.info("**No transformer zoo built yet.** The demo build (`python -m analysis.zoo build --quick`, or "
                "**Home**'s build button) trains it after the demo; on its own: `python -m analysis.zoo "
                "build-transformers --quick` (a few minutes on a CPU). Reload this page when it is done, or give "
                "your own transformers above.")
else:
    tnames = list(tsrc["models"])
    st.caption(f"Models: {tsrc.get('label', 'injected')} — {len(tnames)} seeds, {len(tsrc['data'])} tasks.")
    if "heads" in tsrc:
        st.caption(f"Heads: {tsrc['heads']}.")
    try:
        t1, t2, t3, t4 = st.columns(4)
        ta = url.widget(t1.selectbox, "Model A", key="tr_a", options=tnames, default=tnames[0])
        tb = url.widget(t2.selectbox, "Model B", key="tr_b", options=tnames,
                        default=tnames[min(1, len(tnames) - 1)])
        tmethod = url.widget(t3.radio, "Alignment", key="tr_method", options=list(T_METHODS),
                             default=list(T_METHODS)[0], format_func=T_METHODS.get)
        t_rep = url.widget(t4.checkbox, "REPAIR", key="tr_repair", default=False)
        if ta == tb:
            st.warning("Pick two different models.")
        elif url.widget(st.toggle, "Compute the path", key="tr_path_on", default=False):
            curves, bars = t_paths(tkey, ta, tb, tmethod, t_rep, 7)
            f1, f2 = st.columns(2)
            f1.plotly_chart(interpolation_figure(curves, "loss"), width="stretch")
            f2.plotly_chart(interpolation_figure(curves, "accuracy", title="Test accuracy along the path A → B"),
                            width="stretch")
            st.dataframe(bars.rename(columns=barrier_labels()), hide_index=True, width="stretch")
        tchosen = url.widget(st.multiselect, "Transformers to merge", key="tr_merge", options=tnames,
                             default=tnames[: min(3, len(tnames))])
        if len(tchosen) >= 2 and url.widget(st.toggle, "Compute the merges", key="tr_merge_on", default=False,
                                            help="naive, pairwise weight / activation matching and C2M3"):
            ttable, tcyc = t_merges(tkey, tuple(tchosen), t_rep)
            st.dataframe(ttable, hide_index=True, width="stretch")
            if tcyc is not None:
                st.dataframe(tcyc, hide_index=True, width="stretch")
        if ta != tb and url.widget(st.toggle, "Compare latent spaces by layer", key="tr_latent_on", default=False):
            st.caption(LATENT_CAPTION)
            tsim = t_latent(tkey, ta, tb, tmethod)
            st.plotly_chart(layer_similarity_figure(tsim), width="stretch")
            st.dataframe(tsim.pivot_table(index=["comparison", "measure"], columns="layer", values="value",
                                          sort=False), width="stretch")
        if len(tchosen) >= 2 and url.widget(st.toggle, "Aggregate relative spaces", key="tr_agg_on", default=False,
                                            help="per task, last layer; probes on the training split"):
            tagg = t_aggregation(tkey, tuple(tchosen), 64)
            st.plotly_chart(aggregation_figure(tagg), width="stretch")
            st.dataframe(tagg, hide_index=True, width="stretch")
    except MergescopeError as e:
        st.error(str(e))
