"""Named parameter sets a page can pick as path endpoints: pretrained, each
fine-tuned model, and merges (configurations tried on the Merge page, or a
registry method at its defaults). Each is a delta on the base, cached per
workspace so switching endpoints back and forth never recomputes a merge.
"""
from __future__ import annotations

import json
import re
from typing import Mapping

import torch

PRETRAINED = "pretrained"
FT_PREFIX = "fine-tuned: "
MERGE_PREFIX = "merge: "
SUM = "sum of task vectors"
DEFAULT_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c")


def registry():
    """(METHODS, merge) from analysis.merging, or (None, None) while it is not installed."""
    try:
        from analysis.merging import METHODS, merge
        return METHODS, merge
    except ImportError:
        return None, None


def recipe_label(method: str, knobs: Mapping) -> str:
    """'merge: method (k=v, …)': a merge named by its recipe, so a link can name it in any session."""
    text = ", ".join(f"{k}={repr(v) if isinstance(v, float) else v}" for k, v in knobs.items())
    return f"{MERGE_PREFIX}{method}" + (f" ({text})" if text else "")


def history_configs(history) -> dict[str, dict]:
    """label -> {"method", "knobs"} (+ "model_file" for an iterative run) per configuration tried on the Merge
    page (one per recipe)."""
    out = {}
    for entry in history or []:
        if not isinstance(entry, Mapping) or "method" not in entry:
            continue
        knobs = dict(entry.get("knobs") or {})
        cfg = {"method": entry["method"], "knobs": knobs}
        if entry.get("model_file"):   # an iterative run's saved model (pages/8_Iterative.py): read, not re-merged
            cfg["model_file"] = str(entry["model_file"])
        out[recipe_label(entry["method"], knobs)] = cfg
    return out


_LABEL = re.compile(rf"^{re.escape(MERGE_PREFIX)}(?P<method>\w+)(?: \((?P<knobs>.*?)\))?(?: · (?P<task>.+))?$")


def endpoint_from_label(label: str, tvs, has_data: bool = False) -> dict | None:
    """The merge endpoint a recipe label names (as a link carries it), validated; None when it names none."""
    m = _LABEL.match(label or "")
    methods, _ = registry()
    if m is None or not methods or m["method"] not in methods:
        return None
    method = methods[m["method"]]
    if method.unavailable(len(tvs.tasks), has_data):
        return None
    knobs = {}
    if m["knobs"] and m["knobs"] != "defaults":
        for part in m["knobs"].split(", "):
            if "=" not in part:
                return None
            k, v = part.split("=", 1)
            knobs[k] = v
    try:
        knobs = method.validate(knobs, len(tvs.tasks)) if knobs else {}
    except Exception:  # a knob the method does not declare, or a value out of range
        return None
    spec = {"kind": "merge", "method": m["method"], "knobs": knobs}
    if m["task"] is not None:
        if not getattr(method, "per_task", False) or m["task"] not in tvs.tasks:
            return None
        spec["task"] = m["task"]
    return spec


def endpoint_options(tvs, history=None, include_sum: bool = False, has_data: bool = False,
                     wanted=()) -> dict[str, dict]:
    """label -> spec ({"kind": "pretrained" | "fine_tuned" | "merge" | "sum", ...}).

    A merge appears once per model it yields: once for a merge, once per task
    for per-task methods (TSV-C), each with the task it serves. `wanted`:
    labels a link asks for; each merge recipe among them is offered too, tried
    in this session or not."""
    opts = {PRETRAINED: {"kind": "pretrained"}}
    for t in tvs.tasks:
        opts[f"{FT_PREFIX}{t}"] = {"kind": "fine_tuned", "task": t}
    if include_sum:
        opts[SUM] = {"kind": "sum"}
    methods, _ = registry()
    for label, cfg in history_configs(history).items():
        method = (methods or {}).get(cfg["method"])
        if getattr(method, "per_task", False):  # one model per task: one endpoint per task
            for t in tvs.tasks:
                opts[f"{label} · {t}"] = {"kind": "merge", **cfg, "task": t}
        else:
            opts[label] = {"kind": "merge", **cfg}
    if methods:
        for name in DEFAULT_METHODS:
            m = methods.get(name)
            if m is None or m.unavailable(len(tvs.tasks), has_data):
                continue
            opts[f"{MERGE_PREFIX}{name} (defaults)"] = {"kind": "merge", "method": name, "knobs": {}}
    for label in wanted:
        if label and label not in opts:
            spec = endpoint_from_label(label, tvs, has_data)
            if spec is not None:
                opts[label] = spec
    return opts


def spec_key(spec: Mapping) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def delta_of(ws, spec: Mapping, inputs=None) -> dict[str, torch.Tensor]:
    """The delta on the base for an endpoint spec (memoised in ws.extras).

    `inputs`: the workspace's MergeInputs (spectra, statistics), so a merge
    endpoint reuses what the Merge page computed."""
    memo = ws.extras.setdefault("endpoint_deltas", {})
    key = spec_key(spec)
    if key in memo:
        return memo[key]
    tvs = ws.tvs
    kind = spec["kind"]
    if kind == "pretrained":
        delta = {}
    elif kind == "fine_tuned":
        delta = dict(tvs.task_vector(spec["task"]))
    elif kind == "sum":
        delta = dict(tvs.sum())
    elif kind == "merge" and spec.get("model_file"):
        from analysis.iterative import model_delta
        delta = model_delta(spec["model_file"], tvs)
    elif kind == "merge":
        methods, merge = registry()
        if merge is None:
            from analysis.errors import MergescopeError
            raise MergescopeError("merging methods are not available in this installation (analysis.merging)")
        result = merge(inputs if inputs is not None else tvs, spec["method"], **dict(spec.get("knobs") or {}))
        merged = result.for_task(spec["task"]) if "task" in spec else result
        delta = {k: v.detach().to("cpu", torch.float32) for k, v in merged.items()}
    else:
        raise ValueError(f"unknown endpoint kind {kind!r}")
    if len(memo) > 12:  # keep memory bounded on a large backbone
        memo.pop(next(iter(memo)))
    memo[key] = delta
    return delta
