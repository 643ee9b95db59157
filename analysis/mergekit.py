"""mergekit's language: a mergekit YAML in as a workspace + configuration, and
a configuration tried here out as a mergekit YAML.

mergekit (0.1.5) merges *models*; mergescope merges task vectors
τ_t = θ_t − θ_0 over a base θ_0, with knobs shared by every task. mergekit's
generalized task arithmetic (read from its documentation and source) is, per
tensor: mixed = Σ_t w_t·mask_t·τ̃_t, divided by Σ_t w_t·mask_t (with sign
consensus) or Σ_t w_t (without) when `normalize`, then × `lambda`. Under
that reading the correspondences are (w = per-model `weight`, T tasks):

| mergescope (knobs)                            | mergekit (parameters)                                          |
|---|---|
| weight_averaging                              | linear (weight 1 each, normalize true)                         |
| task_arithmetic (α)                           | task_arithmetic (weight α each, normalize false)               |
| ties (density, α, scope=parameter)            | ties (weight 1, density; normalize true, lambda α)             |
| dare (p, base=task_arithmetic, α)             | dare_linear (weight α, density 1−p; normalize false, rescale)  |
| dare (p, base=ties, density=1, α)             | dare_ties (weight 1, density 1−p; normalize true, rescale, λ α)|
| breadcrumbs (density, gamma, α)               | breadcrumbs (weight 1, density, gamma; normalize false, λ α)   |
| della (density, epsilon, α)                   | della (weight 1, density, epsilon; normalize true, λ α)        |
| slerp (t, α = 1)                              | nuslerp with a base_model (weights 1−t, t; flattened)          |
| model_stock (filter_wise)                     | model_stock (filter_wise)                                      |

Where the two differ on purpose (each named in the exported file's header):
DARE's and DELLA's random masks come from different generators (same
distribution, not the same masks); mergekit's DELLA rescales each kept tensor
to its L1 norm where ours divides each entry by its keep probability (see
analysis/merging/della.py). mergekit's `int8_mask` and `dtype` are storage
options: kept in the recipe, they change no formula.

Not expressible, and refused with the reason instead of writing something
wrong: every method without a mergekit counterpart (TSV, Iso, EpiMer, …);
`karcher` (ours averages task vectors on the sphere, mergekit's the models'
weights); mergekit's `slerp` (it interpolates the weights of base_model and
one model, not two task vectors); per-model parameters that differ between
models, and gradient (list) or filtered parameter values (our knobs are one
scalar shared by every task); settings whose formula is not ours (e.g. `ties`
with normalize false is a sum of agreeing entries, not their mean).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from analysis.errors import ValidationError

# mergekit's own defaults per method (registry of 0.1.5): normalize, rescale
_GTA_DEFAULTS = {
    "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
    "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
    "della": (True, True), "della_linear": (False, True),
}
_NO_EQUIVALENT = {
    "karcher": "mergescope's karcher averages task vectors on the sphere; mergekit's karcher averages the "
               "models' weights (no base model), a different point",
}


class MergekitError(ValidationError):
    """A mergekit configuration mergescope cannot express, or cannot read."""


@dataclass
class MergekitRecipe:
    """A workspace (base + named task checkpoints) and one configuration."""
    base_model: str
    models: dict[str, str]                 # task name -> checkpoint path, in the YAML's order
    method: str                            # a key of analysis.merging.METHODS
    knobs: dict[str, Any]
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    def load(self, **kwargs):
        """The TaskVectorSet of this recipe's checkpoints (paths as given)."""
        from analysis.taskvectors import TaskVectorSet
        return TaskVectorSet.from_checkpoints(self.base_model, self.models, **kwargs)


# ------------------------------------------------------------------ import

def _task_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(p).rstrip("/")).name or str(p)) or "model"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _shared(entries: list[dict], key: str, default=None, where: str = ""):
    """The one value every model gives `key` (mergekit's per-model parameter), else an error."""
    values = {}
    for e in entries:
        v = (e.get("parameters") or {}).get(key, default)
        if isinstance(v, (list, dict)):
            raise MergekitError(f"{where}model {e.get('model')!r}: parameter {key!r} = {v!r} is a gradient or a "
                                f"filtered value; mergescope's knobs are one number shared by every task")
        values[str(e.get("model"))] = v
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        raise MergekitError(f"{where}per-model {key!r} differs between models ({values}); mergescope's knobs "
                            f"are shared by every task, so only equal values can be imported")
    return next(iter(values.values())) if values else default


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MergekitError(f"parameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def read_yaml(source: str | Path) -> MergekitRecipe:
    """A mergekit YAML (a path, or the YAML text) as a MergekitRecipe; raises
    MergekitError naming what cannot be expressed here."""
    text = Path(source).read_text() if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and Path(source).is_file()) else str(source)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergekitError(f"not valid YAML: {exc}") from None
    if not isinstance(cfg, dict) or "merge_method" not in cfg:
        raise MergekitError("a mergekit configuration needs a top-level 'merge_method'")
    if "slices" in cfg:
        raise MergekitError("'slices' (layer ranges per model) are not supported; use 'models'")
    theirs = str(cfg["merge_method"])
    if not cfg.get("base_model"):
        raise MergekitError(f"merge_method {theirs!r}: a 'base_model' is needed (task vectors are differences "
                            f"from it)")
    base = str(cfg["base_model"] if not isinstance(cfg["base_model"], dict) else cfg["base_model"].get("model"))
    entries = [e if isinstance(e, dict) else {"model": e} for e in (cfg.get("models") or [])]
    entries = [e for e in entries if str(e.get("model")) != base]   # mergekit lets the base appear in models
    if not entries:
        raise MergekitError("'models' lists no model besides the base_model")
    paths = [str(e["model"] if not isinstance(e["model"], dict) else e["model"].get("model")) for e in entries]
    models = dict(zip(_task_names(paths), paths))
    g = dict(cfg.get("parameters") or {})
    n = len(entries)
    notes = []
    if g.get("int8_mask") or cfg.get("dtype"):
        notes.append("dtype / int8_mask are storage options: kept in the recipe, no formula changes")
    method, knobs = _import_method(theirs, entries, g, n, notes)
    return MergekitRecipe(base, models, method, knobs, cfg.get("dtype"), notes)


def _import_method(theirs: str, entries, g: dict, n: int, notes: list[str]) -> tuple[str, dict]:
    where = f"merge_method {theirs!r}: "
    if theirs in _GTA_DEFAULTS:
        normalize_default, rescale_default = _GTA_DEFAULTS[theirs]
        normalize = bool(g.get("normalize", normalize_default))
        rescale = bool(g.get("rescale", rescale_default))
        lam = _number(g.get("lambda", 1.0), "lambda")
        w = _number(_shared(entries, "weight", None, where), "weight")
        density = _shared(entries, "density", 1.0, where)
        density = _number(density, "density")
        if theirs in ("dare_ties", "dare_linear", "della", "della_linear") and not rescale:
            raise MergekitError(f"{where}rescale false keeps dropped-out entries unscaled; mergescope's "
                                f"{'DARE' if 'dare' in theirs else 'DELLA'} always rescales")
        consensus = theirs in ("ties", "dare_ties", "della", "breadcrumbs_ties")
        if consensus and not normalize:
            raise MergekitError(f"{where}normalize false sums the entries that agree with the elected sign; "
                                f"mergescope's sign-elected methods take their mean (set normalize: true)")
        # α: consensus methods divide by Σ w·mask (w cancels); linear ones by Σ w = T·w when normalizing
        alpha = lam if consensus else (lam / n if normalize else lam * w)
        if theirs == "task_arithmetic":
            return "task_arithmetic", {"alpha": alpha}
        if theirs == "ties":
            return "ties", {"density": density, "alpha": alpha, "scope": "parameter"}
        if theirs == "dare_linear":
            return "dare", {"drop_rate": 1.0 - density, "base": "task_arithmetic", "alpha": alpha}
        if theirs == "dare_ties":
            notes.append("DARE masks come from mergescope's generator: same distribution, not the same masks")
            return "dare", {"drop_rate": 1.0 - density, "base": "ties", "density": 1.0, "alpha": alpha}
        if theirs == "breadcrumbs":
            gamma = _number(_shared(entries, "gamma", 0.01, where), "gamma")
            return "breadcrumbs", {"density": density, "gamma": gamma, "alpha": alpha}
        if theirs == "della":
            eps = _number(_shared(entries, "epsilon", 0.15, where), "epsilon")
            notes.append("DELLA: mergekit rescales kept tensors to their L1 norm, mergescope divides each entry "
                         "by its keep probability; masks from different generators")
            return "della", {"density": density, "epsilon": eps, "alpha": alpha}
        raise MergekitError(f"{where}no mergescope method has this formula "
                            f"({'sign election without a mean' if consensus else 'a linear variant'}); "
                            f"supported: {sorted(SUPPORTED_IMPORTS)}")
    if theirs == "linear":
        w = _number(_shared(entries, "weight", None, where), "weight")
        if not bool(g.get("normalize", True)) and abs(w * n - 1.0) > 1e-9:
            raise MergekitError(f"{where}normalize false with weights summing to {w * n:g} scales the base model "
                                f"too; only an average (normalize true, or weights summing to 1) is a task-vector merge")
        return "weight_averaging", {}
    if theirs == "nuslerp":
        if n != 2:
            raise MergekitError(f"{where}needs exactly two models besides the base, got {n}")
        if g.get("nuslerp_row_wise") or not g.get("nuslerp_flatten", True):
            raise MergekitError(f"{where}only the flattened form (nuslerp_flatten true, row_wise false) is "
                                f"mergescope's slerp")
        w0, w1 = (_number((e.get("parameters") or {}).get("weight"), "weight") for e in entries)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        return "slerp", {"t": t, "alpha": 1.0}
    if theirs == "model_stock":
        return "model_stock", {"filter_wise": bool(g.get("filter_wise", False))}
    if theirs == "slerp":
        raise MergekitError(f"{where}mergekit's slerp interpolates the weights of base_model and one model; "
                            f"mergescope's slerp interpolates two task vectors (mergekit's nuslerp with a "
                            f"base_model)")
    if theirs in _NO_EQUIVALENT:
        raise MergekitError(f"{where}{_NO_EQUIVALENT[theirs]}")
    raise MergekitError(f"{where}has no mergescope equivalent; supported: {sorted(SUPPORTED_IMPORTS)}")


SUPPORTED_IMPORTS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della",
                     "nuslerp", "model_stock")


# ------------------------------------------------------------------ export

def to_mergekit(method: str, knobs: Mapping[str, Any], base_model: str, models: Mapping[str, str],
                dtype: str | None = None) -> dict:
    """The mergekit configuration (a dict ready for yaml) of one configuration,
    or MergekitError saying why there is none."""
    k = dict(knobs)
    a = float(k.get("alpha", 1.0))

    def each(**params):
        return [{"model": str(p), "parameters": dict(params)} for p in models.values()]

    if method == "weight_averaging":
        cfg = {"merge_method": "linear", "models": each(weight=1.0), "parameters": {"normalize": True}}
    elif method == "task_arithmetic":
        cfg = {"merge_method": "task_arithmetic", "models": each(weight=a),
               "parameters": {"normalize": False, "lambda": 1.0}}
    elif method == "ties":
        if k.get("scope", "model") != "parameter":
            raise MergekitError("ties with scope='model' (the paper's top-k over the whole task vector) has no "
                                "mergekit equivalent: mergekit trims each tensor (scope='parameter')")
        cfg = {"merge_method": "ties", "models": each(weight=1.0, density=float(k["density"])),
               "parameters": {"normalize": True, "lambda": a}}
    elif method == "dare":
        density = 1.0 - float(k["drop_rate"])
        if k.get("base", "task_arithmetic") == "task_arithmetic":
            cfg = {"merge_method": "dare_linear", "models": each(weight=a, density=density),
                   "parameters": {"normalize": False, "rescale": True, "lambda": 1.0}}
        else:
            if float(k.get("density", 1.0)) < 1.0:
                raise MergekitError("dare with base='ties' and a TIES trim (density < 1) has no mergekit "
                                    "equivalent: mergekit's dare_ties drops at random only")
            cfg = {"merge_method": "dare_ties", "models": each(weight=1.0, density=density),
                   "parameters": {"normalize": True, "rescale": True, "lambda": a}}
    elif method == "breadcrumbs":
        cfg = {"merge_method": "breadcrumbs",
               "models": each(weight=1.0, density=float(k["density"]), gamma=float(k["gamma"])),
               "parameters": {"normalize": False, "lambda": a}}
    elif method == "della":
        cfg = {"merge_method": "della",
               "models": each(weight=1.0, density=float(k["density"]), epsilon=float(k["epsilon"])),
               "parameters": {"normalize": True, "rescale": True, "lambda": a}}
    elif method == "slerp":
        if abs(a - 1.0) > 1e-12:
            raise MergekitError(f"slerp with alpha={a:g} has no mergekit equivalent (nuslerp has no scaling)")
        t = float(k.get("t", 0.5))
        paths = list(models.values())
        if len(paths) != 2:
            raise MergekitError(f"slerp needs exactly two task checkpoints, got {len(paths)}")
        cfg = {"merge_method": "nuslerp",
               "models": [{"model": str(paths[0]), "parameters": {"weight": 1.0 - t}},
                          {"model": str(paths[1]), "parameters": {"weight": t}}],
               "parameters": {"nuslerp_flatten": True, "nuslerp_row_wise": False}}
    elif method == "model_stock":
        cfg = {"merge_method": "model_stock", "models": [{"model": str(p)} for p in models.values()],
               "parameters": {"filter_wise": bool(k.get("filter_wise", False))}}
    elif method in _NO_EQUIVALENT:
        raise MergekitError(f"{method}: {_NO_EQUIVALENT[method]}; not exported")
    else:
        raise MergekitError(f"{method} has no mergekit equivalent (mergekit shares: weight_averaging, "
                            f"task_arithmetic, ties, dare, breadcrumbs, della, slerp, model_stock); not exported")
    out = {"merge_method": cfg["merge_method"], "base_model": str(base_model), "models": cfg["models"],
           "parameters": cfg["parameters"]}
    if dtype:
        out["dtype"] = dtype
    return out


def export_yaml(method: str, knobs: Mapping[str, Any], base_model: str, models: Mapping[str, str],
                dtype: str | None = None) -> str:
    """`to_mergekit` as YAML text, headed by a comment that says where it came from and how it differs."""
    cfg = to_mergekit(method, knobs, base_model, models, dtype)
    knob_text = ", ".join(f"{k}={v}" for k, v in knobs.items())
    header = [f"# exported by mergescope from {method}({knob_text})"]
    if method in ("dare", "della"):
        header.append("# random masks: mergekit's generator, not mergescope's (same distribution, other masks)")
    if method == "della":
        header.append("# mergekit rescales kept tensors to their L1 norm; mergescope divides by keep probability")
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


def export_workspace_yaml(tvs, method: str, knobs: Mapping[str, Any], dtype: str | None = None) -> str:
    """`export_yaml` for a loaded TaskVectorSet, with its checkpoint paths (`tvs.sources`).

    MergekitError when the method has none (checked first), or when a model
    has no path on disk (a set built from state dicts in memory): mergekit
    reads every model from a folder or the Hub, so such a YAML could not run."""
    sources = getattr(tvs, "sources", {}) or {}
    models = {t: sources.get(t, t) for t in tvs.tasks}
    base = sources.get("base", "base")
    to_mergekit(method, knobs, base, models, dtype)   # the method's own refusal comes first
    in_memory = [label for label in ("base", *tvs.tasks) if label not in sources or str(sources[label]).startswith("<")]
    if in_memory:
        raise MergekitError(f"mergekit reads every model from disk (a Hugging Face folder or a Hub id), and this "
                            f"set's {', '.join(repr(x) for x in in_memory)} "
                            f"{'was' if len(in_memory) == 1 else 'were'} given in memory, with no path; load the set "
                            f"from checkpoint folders to export a mergekit YAML")
    return export_yaml(method, knobs, base, models, dtype)


def paths_mergekit_cannot_read(tvs) -> dict[str, str]:
    """{label: path} of the set's models that are not a Hugging Face model folder (config.json) here:
    mergekit loads only those (or Hub ids), so a YAML naming them needs the paths edited."""
    out = {}
    for label, origin in (getattr(tvs, "sources", {}) or {}).items():
        if str(origin).startswith("<"):
            continue
        p = Path(origin).expanduser()
        if not (p.is_dir() and (p / "config.json").is_file()):
            out[label] = str(origin)
    return out


def source_dtype(tvs) -> str | None:
    """mergekit's name of the base's dtype (its `dtype:` key), e.g. 'bfloat16'; None if not one it knows."""
    names = list(getattr(tvs, "param_names", []))
    if not names:
        return None
    name = str(tvs.base.dtype(names[0])).removeprefix("torch.")
    return name if name in ("float32", "float16", "bfloat16") else None
