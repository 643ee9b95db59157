"""Report: every configuration tried on the Merge page, compared and exported.

Reads st.session_state["merge_history"] (written by pages/3_Merge.py) and
compares each row with the zero-shot / fine-tuned references scored on the
same examples (its subsample, or the workspace's full-split table). Exports: CSV tables, each
figure as PNG / SVG (kaleido + a local Chromium), one self-contained HTML
report with the configuration that reproduces it, and per configuration a
mergekit YAML (or why there is none) and the merged backbone as a Hugging Face
folder (config.json, sharded safetensors + index in the base's dtype,
heads.safetensors): ui/export.py, ui/mergekit.py.
Choices live in the URL (rp_* query parameters, ui/url.py), and so do the
rows compared (rp_rows: each row's recipe and how it was scored), which a
link opened in a new session scores again; rows can be removed here.
"""
from __future__ import annotations

import json

import streamlit as st

from analysis.errors import MergescopeError
from analysis.plots.report import grouped_bars, radar
from analysis.report import METRIC_TITLES, comparison_table, export_status, figure_bytes, html_report, wide_table
from ui import history as merge_history
from ui import url
from ui.export import merged_model_section
from ui.labelfree import history_table as label_free_table
from ui.state import references, require_workspace, start_page

start_page("Report")
ws = require_workspace()
tvs = ws.tvs
if url.first_run("rp_split"):   # a link opened in a new session: score the rows it was made with
    merge_history.restore_from_link(ws, "rp_rows")
history = merge_history.entries()
if history:
    url.set_param("rp_rows", [merge_history.entry_text(e) for e in history])
else:
    url.drop("rp_rows")

if not history and (ws.reference is None or not len(ws.reference)):
    st.info("Nothing to compare yet: try configurations on the **Merge** page; each one tried appears here.")
    st.stop()
if not any(e.get("per_task") for e in history) and (ws.reference is None or not len(ws.reference)):
    # no labelled data: the label-free comparisons of each configuration, and its merged model
    st.info("This set has no labelled data, so there are no accuracies to compare. Each configuration looked "
            "at on the **Merge** page is listed with its label-free comparisons (means over tasks).")
    st.dataframe(label_free_table([e for e in history if e.get("label_free")]), hide_index=True, key="rp_label_free")
    merged_model_section(ws, history, {"name": ws.name, "tasks": list(tvs.tasks), "sources": dict(tvs.sources)})
    st.stop()
history = [e for e in history if e.get("per_task")] or history  # label-free rows have no accuracies to chart
if not history:
    st.info("No merge configuration tried yet in this session: the **Merge** page adds each one it evaluates. "
            "Meanwhile the reference models are shown.")

splits = list(dict.fromkeys(str(e.get("split", "validation")) for e in history)) or ["validation"]
if ws.reference is not None and len(ws.reference):
    splits += [s for s in dict.fromkeys(ws.reference["split"]) if s not in splits]
has_ref = ws.reference is not None and len(ws.reference) > 0
metric_labels = {"absolute accuracy": "accuracy", "normalised (÷ fine-tuned)": "normalized_accuracy",
                 "NAI ((m − zero-shot) ÷ (fine-tuned − zero-shot))": "normalized_accuracy_improvement"}
if not has_ref:
    metric_labels = {"absolute accuracy": "accuracy"}


c1, c2, c3 = st.columns([1, 2, 1])
split = url.widget(c1.selectbox, "Split", key="rp_split", options=splits, default=splits[0])
metric_label = url.widget(c2.radio, "Score", key="rp_metric", options=list(metric_labels),
                          default=list(metric_labels)[0], horizontal=True)
chart = url.widget(c3.radio, "View", key="rp_chart", options=["grouped bars", "radar"], default="grouped bars",
                   horizontal=True)
metric = metric_labels[metric_label]

@st.cache_data(show_spinner=False, max_entries=64)
def cached_comparison(history: list, reference, split: str):
    return comparison_table(history, reference, split=split)


def same_example_references(split: str) -> dict | None:
    """{examples per task: references scored on them} for every count this split's rows were scored on,
    so that each row is drawn and normalised beside references on its own examples (as on Merge)."""
    if ws.evaluator is None:
        return ws.reference
    counts = dict.fromkeys(e.get("subsample") for e in history if e.get("split", "validation") == split)
    return {n: references(ws, ws.key, split, n) for n in counts or ([None] if has_ref else [])}


try:
    comp = cached_comparison(history, same_example_references(split), split)
except MergescopeError as exc:
    st.error(f"The configurations could not be compared: {exc}")
    st.stop()
tasks = list(ws.evaluator.tasks) if ws.evaluator is not None else list(tvs.tasks)
wide = wide_table(comp, metric, tasks)
if wide.empty:
    st.warning(f"No {METRIC_TITLES.get(metric, metric)} on the {split} split for these configurations.")
    st.stop()

n_tasks = comp.loc[comp["metric"] == metric, "task"].nunique()
if chart == "radar" and n_tasks < 3:
    st.caption("A radar needs at least 3 tasks to enclose an area; showing grouped bars.")
    chart_used = "grouped bars"
else:
    chart_used = chart
figure_of = grouped_bars if chart_used == "grouped bars" else radar
fig = figure_of(comp, metric, tasks, title=f"{METRIC_TITLES.get(metric, metric)} per task", subtitle=f"{split} split")
st.plotly_chart(fig, key="rp_figure", config={"displaylogo": False})

shown = wide_table(comp, metric, tasks, percent=True)
st.dataframe(shown.round(1), hide_index=True, key="rp_table",
             column_config={"knobs": st.column_config.TextColumn("knobs (JSON)")})
st.caption(f"{METRIC_TITLES.get(metric, metric)}; 'mean' is the unweighted mean over tasks.")
merge_history.removal_control("rp_history")

# ---------------------------------------------------------------- exports
st.subheader("Export")
config = {"workspace": {"name": ws.name, "tasks": list(tvs.tasks), "sources": dict(tvs.sources),
                        "recipe": ws.recipe},
          "split": split, "score": metric, "view": chart, "configurations": [
              {"method": e.get("method"), "knobs": e.get("knobs", {}), "split": e.get("split")} for e in history],
          "query": {k: st.query_params.get_all(k) for k in st.query_params}}   # this view's link (ui/url.py)

e1, e2, e3 = st.columns(3)
e1.download_button("Table (CSV, tidy)", comp.to_csv(index=False).encode(), "mergescope_comparison.csv", "text/csv",
                   key="rp_csv_tidy", on_click="ignore")
e1.download_button("Table (CSV, as shown, %)", shown.to_csv(index=False).encode(), f"mergescope_{metric}.csv",
                   "text/csv", key="rp_csv_wide", on_click="ignore")

ok, why = export_status()
if ok:
    e2.download_button("Figure (PNG, print resolution)", lambda: figure_bytes(fig, "png"), f"mergescope_{metric}.png",
                       "image/png", key="rp_png", on_click="ignore")
    e2.download_button("Figure (SVG)", lambda: figure_bytes(fig, "svg"), f"mergescope_{metric}.svg",
                       "image/svg+xml", key="rp_svg", on_click="ignore")
    e2.caption(why)
else:
    e2.warning(f"PNG/SVG export is not possible here: {why}")


def report_html() -> bytes:
    figures = {f"{METRIC_TITLES.get(metric, metric)} (grouped bars)": grouped_bars(comp, metric, tasks),
               f"{METRIC_TITLES.get(metric, metric)} (radar)": radar(comp, metric, tasks)}
    tables = {f"{METRIC_TITLES.get(m, m)}": wide_table(comp, m, tasks, percent=True)
              for m in dict.fromkeys(comp["metric"])}
    last = ws.extras.get("landscape_last")
    if last is not None:
        from analysis.landscape import barrier_table
        from analysis.plots.landscape import path_figure
        coord = "lam" if "lam" in last["curves"] else "alpha"
        figures[f"Loss landscape: {last['title']}"] = path_figure(last["curves"], tasks, coord, title=last["title"])
        if "barriers" in last:
            tables["Loss barriers (nats)"] = barrier_table(last["barriers"], "loss")
            tables["Accuracy barriers (percentage points)"] = barrier_table(last["barriers"], "accuracy", scale=100.0)
    return html_report(f"mergescope report · {ws.name}", figures, tables, config).encode()


e3.download_button("Report (self-contained HTML)", report_html, "mergescope_report.html", "text/html",
                   key="rp_html", type="primary", on_click="ignore")
e3.caption("Figures are interactive and work offline; the configuration JSON at the end reproduces them.")

# ---------------------------------------------------------------- merged model
merged_model_section(ws, history, config["workspace"])

with st.expander("Configuration (JSON)"):
    st.code(json.dumps(config, indent=2, default=str), language="json")
