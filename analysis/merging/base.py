"""Merge methods as data: a method declares its knobs, the engine validates them.

A `MergeMethod` is a small unit (mergekit's style): a name, a one-line summary,
its `Hyperparameter` declarations and a function
`fn(tvs, params, ctx) -> dict`. The Merge page builds its widgets from
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
    use `default_for(n_tasks)` to get the value. `low`/`high` are inclusive.
    """

    name: str
    type: str                      # "float" | "int" | "bool" | "choice"
    default: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    help: str = ""
    choices: tuple = ()

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
                "high": self.high, "step": self.step, "help": self.help, "choices": list(self.choices)}


@dataclass(frozen=True)
class MergeMethod:
    """A merging method: declared knobs + a pure function.

    `fn(tvs, params, ctx)` gets the validated knobs and a `MergeContext`
    (device, spectral cache, polar solver) and returns `{param: delta}`, or
    `{task: {param: delta}}` when `per_task` is true (TSV-C).
    """

    name: str
    summary: str
    fn: Callable
    hyperparameters: tuple[Hyperparameter, ...]
    uses_spectra: bool = False     # takes the SpectralCache (a rank change never recomputes an SVD)
    per_task: bool = False         # returns one delta per task
    n_tasks: int | None = None     # exact number of tasks required (slerp: 2)
    reference: str = ""

    def knob(self, name: str) -> Hyperparameter:
        for hp in self.hyperparameters:
            if hp.name == name:
                return hp
        raise HyperparameterError(f"{self.name}: no hyperparameter named {name!r}; "
                                  f"it has {[h.name for h in self.hyperparameters]}")

    def defaults(self, n_tasks: int) -> dict:
        return {hp.name: hp.default_for(n_tasks) for hp in self.hyperparameters}

    def validate(self, params: Mapping[str, Any], n_tasks: int) -> dict:
        """Declared defaults overlaid with `params`, each checked against its declaration."""
        known = {hp.name for hp in self.hyperparameters}
        unknown = [k for k in params if k not in known]
        if unknown:
            raise HyperparameterError(f"{self.name}: unknown hyperparameter {unknown[0]!r}; "
                                      f"it takes {sorted(known)}")
        if self.n_tasks is not None and n_tasks != self.n_tasks:
            raise HyperparameterError(f"{self.name} merges exactly {self.n_tasks} tasks; this set has {n_tasks} "
                                      "(use tvs.subset([...]) to pick them)")
        out = self.defaults(n_tasks)
        for key, value in params.items():
            out[key] = self.knob(key).validate(value, self.name)
        return out


@dataclass
class MergeContext:
    """What a method may use besides the task vectors."""

    device: Any
    cache: Any = None              # analysis.spectra.SpectralCache, or None
    polar: str = "auto"            # "auto" | "exact" | "newton_schulz"
    memo: dict = field(default_factory=dict)  # per-cache memo (SVDs of task sums)


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
