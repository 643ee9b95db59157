"""Iterative merging: ATM and ColD Fusion, round by round, as a background job.

The engine is `analysis.iterative` (runs cached by content and resumable); this
page picks a configuration, starts or resumes the run in a background thread
(`ui.jobs.BackgroundJob`), and draws the per-round curves from the run's
folder as rounds finish. A finished run's final model joins the Merge history
(st.session_state["merge_history"], see pages/3_Merge.py) with
`"model_file"`: the Report and Loss Landscape pages read that model instead
of re-merging. Every choice is kept in the URL (it_* parameters, ui/url.py).
"""
from __future__ import annotations


import streamlit as st

from analysis.errors import MergescopeError
from analysis.evaluation import Evaluator
from analysis.iterative import PRESETS, load_run, preset, run, run_folder, source_key
from analysis.merging import METHODS, available_methods
from analysis.plots.iterative import accuracy_curves, geometry_curves, heldout_curves
from ui import url
from ui.jobs import BackgroundJob
from ui.state import require_workspace, start_page

HISTORY_KEY = "merge_history"
LABELS = {"atm": "ATM (alternating tuning and merging)", "cold_fusion": "ColD Fusion (collaborative descent)"}

start_page("Iterative merging")
ws = require_workspace()
ev = ws.evaluator
if ev is None:
    st.info("Iterative merging fine-tunes on each task's data, and this workspace has none (your own checkpoints "
            "come without task heads or datasets). Load the built-in demo on **Home**.")
    st.stop()
tasks = [t for t in ws.tvs.tasks if t in ev.tasks and "train" in ev.data[t]]
if not tasks:
    st.info("No task of this set has a training split to fine-tune on.")
    st.stop()
demo = ws.extras.get("demo")
build = dict(demo.manifest["config"]) if demo is not None else {}
sizes = {t: ev.split_size(t, "train") for t in tasks}


@st.cache_resource(show_spinner=False)
def iterative_jobs() -> dict:
    """run folder -> BackgroundJob; process-wide so one run executes once."""
    return {}


def source_for(names: tuple) -> str:
    memo = ws.extras.setdefault("iterative_sources", {})
    if names not in memo:
        memo[names] = source_key(ev, names)
    return memo[names]


# ---------------------------------------------------------------- configuration
# every choice is in the URL (it_* parameters, ui/url.py); the budget knobs and the round's merge are
# per preset / procedure, so they are read from a link only for the preset / procedure that link named
LINK = {p: st.query_params.get(p) for p in ("it_procedure", "it_preset")}
left, right = st.columns([1, 2.4])
with left:
    procedure = url.widget(st.radio, "Procedure", key="it_procedure", options=list(LABELS), default="atm",
                           format_func=LABELS.get)
    name = url.widget(st.selectbox, "Preset", key="it_preset", options=list(PRESETS[1:]), default=PRESETS[1],
                      help="quick: 3 rounds (CPU); full: 5 rounds. Either way each task's total fine-tuning "
                           "budget is the build's own, split over the rounds")
    same_preset = LINK["it_preset"] == name
    heldout = []
    if procedure == "cold_fusion":
        if len(tasks) < 2:
            st.warning("ColD Fusion needs at least one contributor and one held-out task.")
            st.stop()
        default_held = tasks[-2:] if len(tasks) > 3 else tasks[-1:]
        heldout = url.widget(st.multiselect, "Held-out tasks (never fused; probed per round)", key="it_heldout",
                             options=tasks, default=default_held)
    else:
        url.drop("it_heldout", "it_hsteps")
    contributors = [t for t in tasks if t not in heldout]
    if not contributors:
        st.warning("Every task is held out: keep at least one to fuse.")
        st.stop()
    base_cfg = preset(name, procedure, contributors, build, sizes, heldout=heldout)
    rounds = url.widget(st.number_input, "Rounds R", key=f"it_rounds_{name}", param="it_rounds",
                        default=base_cfg.rounds, min_value=1, max_value=50, url=same_preset)
    steps = url.widget(st.number_input, "Fine-tuning steps per task, all rounds together", key=f"it_steps_{name}",
                       param="it_steps", default=max(int(rounds), base_cfg.total_steps), min_value=int(rounds),
                       max_value=100_000, url=same_preset,
                       help="the build's own budget by default, so the comparison with one-shot merging is fair")
    offered = [m for m in available_methods(len(contributors), True) if not METHODS[m].per_task]
    method = url.widget(st.selectbox, "Merge of each round", key=f"it_method_{procedure}", param="it_method",
                        options=offered, default=base_cfg.merge_method,
                        url=LINK["it_procedure"] == procedure)
    defaults = METHODS[method].defaults(len(contributors))
    st.caption(f"{METHODS[method].summary}. Knobs at their defaults: "
               + (", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"))
    subsample = url.widget(st.number_input, "Examples per task scored each round (0 = the whole split)",
                           key="it_subsample", default=0, min_value=0, max_value=100_000, step=50)
    overrides = {"rounds": int(rounds), "total_steps": int(steps), "merge_method": method,
                 "eval_subsample": int(subsample) or None}
    if int(steps) != base_cfg.total_steps or int(rounds) != base_cfg.rounds:
        overrides["task_total_steps"] = ()   # the user's budget, the same for every task
    if procedure == "cold_fusion":
        overrides["heldout_steps"] = int(url.widget(
            st.number_input, "Short fine-tune on each held-out task (steps)", key=f"it_hsteps_{name}",
            param="it_hsteps", default=base_cfg.heldout_steps, min_value=1, max_value=100_000, url=same_preset))
    try:
        config = preset(name, procedure, contributors, build, sizes, heldout=heldout, **overrides)
    except MergescopeError as exc:
        st.error(str(exc))
        st.stop()
    per_round = sorted({config.steps(t, 1) for t in contributors})
    st.caption(f"{len(contributors)} task(s) × {config.rounds} rounds, "
               f"{'/'.join(map(str, per_round))} steps per task in round 1.")

with st.spinner("Hashing the starting model and data (once per configuration of tasks)…"):
    source = source_for(tuple(config.tasks + config.heldout))
folder = run_folder(config, source)
jobs = iterative_jobs()
job = jobs.get(str(folder))


def record(result) -> None:
    """The final model joins the Merge history once (Report and Loss Landscape read it from there)."""
    history = st.session_state.setdefault(HISTORY_KEY, [])
    if any(h.get("model_file") == str(result.model_path) for h in history):
        return
    per_task = result.final_accuracy()
    knobs = {"rounds": config.rounds, "total_steps": config.total_steps, "merge": config.merge_method,
             **({"heldout": ",".join(config.heldout)} if config.heldout else {})}
    history.append({"method": config.procedure, "knobs": knobs, "split": config.eval_split,
                    "subsample": config.eval_subsample, "per_task": per_task,
                    "mean": sum(per_task.values()) / max(1, len(per_task)), "model_file": str(result.model_path)})


def draw(result) -> None:
    t = result.table
    st.plotly_chart(accuracy_curves(t, list(config.tasks) + list(config.heldout),
                                    title=f"{config.procedure}: accuracy per round ({config.eval_split} split)"),
                    key="it_accuracy")
    if (t["metric"] == "cosine").any():
        st.plotly_chart(geometry_curves(t), key="it_geometry")
    if config.heldout:
        st.plotly_chart(heldout_curves(t, list(config.heldout)), key="it_heldout_curves")
    wide = t[t["task"].isin(["mean", "all"])].pivot_table(index="round", columns="metric", values="value")
    st.dataframe(wide, key="it_table")
    if result.seconds:
        st.caption("wall time per round (s): " + ", ".join(f"{r}: {s:.1f}" for r, s in sorted(result.seconds.items())))


with right:
    partial = load_run(folder) if (folder / "config.json").is_file() else None
    if job is not None and job.running:
        @st.fragment(run_every=2.0)
        def poll():
            fraction, message = job.state()
            st.progress(fraction, text=f"{message} · {job.elapsed:.0f} s")
            now = load_run(folder) if (folder / "config.json").is_file() else None
            if now is not None and len(now.table):
                draw(now)
            if not job.running:
                st.rerun()
        st.info("Running in the background: you can leave this page; curves appear as rounds finish.")
        poll()
    else:
        if job is not None and job.error is not None:
            st.error(f"The run stopped: {job.error}")
            with st.expander("Details"):
                st.code(job.details)
        if partial is not None and partial.finished:
            st.success(f"Finished: {config.rounds} rounds · final mean accuracy "
                       f"{partial.metric('mean_accuracy')['mean'].iloc[-1]:.2%} · cached in `{folder}`")
            record(partial)
            draw(partial)
        else:
            if partial is not None and len(partial.table):
                st.caption(f"{partial.rounds_done} of {config.rounds} rounds finished earlier; the run resumes "
                           "from there.")
                draw(partial)
            label = "Resume" if partial is not None and len(partial.table) else "Start"
            if st.button(f"{label} {config.procedure} ({config.rounds} rounds)", type="primary", key="it_start"):
                # the job scores with its own copy of the backbone: the workspace's evaluator swaps tensors
                # into its module for every score, and other pages keep using it while the job runs
                own = Evaluator(ev.backbone_copy(), ev.data, ev.heads, device=ev.device)
                jobs[str(folder)] = BackgroundJob(lambda report: run(config, own, progress=report, source=source),
                                                  f"iterative-{config.procedure}")
                st.rerun()
