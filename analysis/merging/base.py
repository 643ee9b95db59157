"""Merge methods as data: a method declares its knobs, the engine validates them.

A `MergeMethod` is a small unit (mergekit's style): a name, a one-line summary,
its `Hyperparameter` declarations, what it `Needs`, and a function of one
parameter group; the engine (`analysis.merging.engine`) owns the loop. The Merge page builds its widgets from
`hyperparameters`; `merge()` validates the values against them before the
function runs, so no method ever sees an out-of-range knob.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from analysis.errors import HyperparameterError

TYPES = ("float", "int", "bool", "choice")


@dataclass(frozen=True)
class Hyperparameter:
    """One knob of a method.

    `default` may be a callable of the number of tasks (e.g. `lambda T: 1 / T`);
    use `default_for(n_tasks)` to get the value. `low`/`high` are inclusive;
    `capped_by_tasks` marks a knob that counts tasks, whose upper end is also
    T (`high_for(n_tasks)`; `MergeMethod.validate` enforces it).
    """

    name: str
    type: str                      # "float" | "int" | "bool" | "choice"
    default: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    help: str = ""
    choices: tuple = ()
    capped_by_tasks: bool = False

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"hyperparameter {self.name!r}: type must be one of {TYPES}, got {self.type!r}")
        if self.type == "choice" and not self.choices:
            raise ValueError(f"hyperparameter {self.name!r}: a choice needs `choices`")

    def default_for(self, n_tasks: int) -> Any:
        value = self.default(n_tasks) if callable(self.default) else self.default
        if self.type == "float" and self.step:
            # keep a computed default (1/T) on the slider's grid and in range
            value = min(max(value, self.low), self.high)
        return value

    def high_for(self, n_tasks: int):
        """The largest accepted value on a set of `n_tasks` tasks."""
        return min(self.high, n_tasks) if self.capped_by_tasks else self.high

    def validate(self, value: Any, method: str = "") -> Any:
        """The value, coerced to the declared type; HyperparameterError otherwise."""
        where = f"{method}: " if method else ""
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise HyperparameterError(f"{where}hyperparameter {self.name!r} must be true or false, got {value!r}")
        if self.type == "choice":
            if value in self.choices:
                return value
            raise HyperparameterError(f"{where}hyperparameter {self.name!r} must be one of {list(self.choices)}, "
                                      f"got {value!r}")
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise HyperparameterError(f"{where}hyperparameter {self.name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise HyperparameterError(f"{where}hyperparameter {self.name!r} must be finite, got {value!r}")
        if self.type == "int":
            if number != int(number):
                raise HyperparameterError(f"{where}hyperparameter {self.name!r} must be an integer, got {value!r}")
            number = int(number)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise HyperparameterError(f"{where}hyperparameter {self.name!r} = {value!r} is out of range: "
                                      f"expected {self.low} <= {self.name} <= {self.high}")
        return number

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "default": self.default, "low": self.low,
                "high": self.high, "step": self.step, "help": self.help, "choices": list(self.choices),
                "capped_by_tasks": self.capped_by_tasks}


@dataclass(frozen=True)
class Needs:
    """What a method needs besides its knobs: the one check every caller uses
    (Merge page, Report page, demo table, contract tests) to decide whether a
    method is available for a workspace."""

    min_tasks: int = 1
    max_tasks: int | None = None
    spectra: bool = False          # per-task SVD factors (SpectralCache)
    labelled_data: bool = False    # an evaluator with every task's data and head
    activations: bool = False      # per-task input Gram matrices of linear layers
    gradients: bool = False        # per-task diagonal Fisher

    def unmet(self, n_tasks: int, has_data: bool) -> str | None:
        """Why the method cannot run on a set of `n_tasks` tasks (None: it can)."""
        if self.max_tasks == self.min_tasks and n_tasks != self.min_tasks:
            return (f"merges exactly {self.min_tasks} tasks; this set has {n_tasks} "
                    "(use tvs.subset([...]) to pick them)")
        if n_tasks < self.min_tasks:
            return f"needs at least {self.min_tasks} tasks; this set has {n_tasks}"
        if self.max_tasks is not None and n_tasks > self.max_tasks:
            return f"merges at most {self.max_tasks} tasks; this set has {n_tasks}"
        if (self.labelled_data or self.activations or self.gradients) and not has_data:
            return "needs labelled data for every task (an evaluator with each task's data and head)"
        return None


def mean_rule(stacked, params: Mapping[str, Any]):
    """The vector rule: α × mean over tasks (1-D parameters and anything a
    method does not merge itself; the papers average them)."""
    return params.get("alpha", 1.0) * stacked.mean(0)


def own_delta_rule(stacked, params: Mapping[str, Any]):
    """Per-task methods (TSV-C): every task keeps its own delta."""
    return stacked


@dataclass(frozen=True)
class MergeMethod:
    """A merging method: declared knobs and needs + a function of one parameter group.

    The engine (`analysis.merging.engine.run`) owns the loop: it walks the
    parameters, calls `merge_group(group, params, ctx)` for the names the
    method covers, and gives every other name the method's `rest` rule
    (default: α × mean). `merge_group` returns `{name: delta}` for its group,
    or `{name: (T, *shape)}` (one delta per task) when `per_task` is true.

    - `covers(tvs, params) -> names` picks the parameters `merge_group` sees
      (None: all of them).
    - `group_by`: "param" (one name per call) or "shape" (same-shaped
      matrices together, so SVD work is batched).
    - `prepare(inputs, params, ctx)`: an optional pass over the whole model
      before the loop (TIES' model-wide trim threshold); its return value is
      `ctx.state`. `peak_memory` declares what the method holds at once
      beyond the engine's one group (engine docstring: peak memory): what a
      prepare pass holds, what it keeps across groups.
    - `same_merge(params, tvs)` / `note(params, tvs)`: optional; the first maps knobs to what
      decides the merge (`merge_key`), the second says in one line what the knobs do on this set
      where that is not what they read (a rank cap that binds), or None.
    - `check(params)`: optional constraints between knobs (DELLA's
      density ± ε inside (0, 1)), run by `validate` after every knob passed
      its own range; raises HyperparameterError naming the knobs.
    """

    name: str
    summary: str
    merge_group: Callable
    hyperparameters: tuple[Hyperparameter, ...] = ()
    needs: Needs = Needs()
    covers: Callable | None = None
    rest: Callable = mean_rule
    group_by: str = "param"
    prepare: Callable | None = None
    per_task: bool = False         # one model per task (TSV-C); scored per task
    reference: str = ""
    peak_memory: str = "one parameter group (T deltas of one tensor, or of one shape-group run)"
    check: Callable | None = None
    same_merge: Callable | None = None
    note: Callable | None = None

    def merge_key(self, params: Mapping[str, Any], tvs) -> str:
        """A JSON key shared by validated knobs that give the same merged model: `same_merge(params, tvs)`
        where the method declares one (TSV-M: rank fractions that keep the same number of triplets per
        layer), else the knobs themselves. Pages key their caches of merges and scores by it."""
        import json
        return json.dumps(self.same_merge(params, tvs) if self.same_merge is not None else dict(params),
                          sort_keys=True)

    def knob(self, name: str) -> Hyperparameter:
        for hp in self.hyperparameters:
            if hp.name == name:
                return hp
        raise HyperparameterError(f"{self.name}: no hyperparameter named {name!r}; "
                                  f"it has {[h.name for h in self.hyperparameters]}")

    def defaults(self, n_tasks: int) -> dict:
        return {hp.name: hp.default_for(n_tasks) for hp in self.hyperparameters}

    def unavailable(self, n_tasks: int, has_data: bool = True) -> str | None:
        """Why this method cannot run here (None: it can); see `Needs.unmet`."""
        return self.needs.unmet(n_tasks, has_data)

    def validate(self, params: Mapping[str, Any], n_tasks: int) -> dict:
        """Declared defaults overlaid with `params`, each checked against its declaration."""
        known = {hp.name for hp in self.hyperparameters}
        unknown = [k for k in params if k not in known]
        if unknown:
            raise HyperparameterError(f"{self.name}: unknown hyperparameter {unknown[0]!r}; "
                                      f"it takes {sorted(known)}")
        why = self.needs.unmet(n_tasks, has_data=True)
        if why:
            raise HyperparameterError(f"{self.name} {why}")
        out = self.defaults(n_tasks)
        for key, value in params.items():
            hp = self.knob(key)
            out[key] = hp.validate(value, self.name)
            if hp.capped_by_tasks and out[key] > hp.high_for(n_tasks):
                raise HyperparameterError(f"{self.name}: hyperparameter {key!r} = {value!r} is out of range: "
                                          f"at most the number of tasks ({n_tasks})")
        if self.check is not None:
            self.check(out)
        return out


@dataclass
class MergeContext:
    """What a method may use besides the parameter group: the device, the
    inputs object (spectra, statistics, data), the polar and top-k solvers, a memo that
    lives as long as the inputs (SVDs of task sums, the last unscaled merge)
    and the state returned by the method's `prepare` pass."""

    device: Any
    inputs: Any = None             # analysis.merging.inputs.MergeInputs
    cache: Any = None              # the SpectralCache for this call (spectral methods), else None
    polar: str = "auto"            # "auto" | "exact" | "gram" | "newton_schulz"
    topk: str = "auto"             # top-k eigenpairs: "auto" | "exact" | "subspace" (analysis.svd.top_k_eigh)
    memo: dict = field(default_factory=dict)
    state: Any = None


# Knobs shared by several methods, declared once.
def alpha(default: float = 1.0, high: float = 3.0) -> Hyperparameter:
    return Hyperparameter("alpha", "float", default, 0.0, high, 0.05, "scaling α of the merged delta (θ = θ₀ + α·…)")


def include_embeddings() -> Hyperparameter:
    return Hyperparameter("include_embeddings", "bool", False,
                          help="also decompose embedding matrices (off: they get the vector rule α × mean)")


def rank_fraction(default=lambda n_tasks: 1.0 / n_tasks) -> Hyperparameter:
    return Hyperparameter("rank_fraction", "float", default, 0.005, 1.0, 0.005,
                          "fraction f of each layer's rank r kept per task: ⌊f·r⌋ singular triplets (default 1/T)")


def check_positive_tasks(tasks: Sequence[str]) -> None:
    if not tasks:
        raise HyperparameterError("no tasks to merge")
