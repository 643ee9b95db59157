"""What an iterative merging run is: the procedure, its tasks, its budget, its merge.

`IterativeConfig` is frozen data; its `key()` (with the content key of the
starting model and data, see `analysis.iterative.runner.source_key`) names the
run's cache folder, so a changed knob is a different run and an unchanged one
is found again.

Budget: `total_steps` fine-tuning steps per task over the whole run (the same
number ordinary fine-tuning spends on that task, so comparisons are fair),
split evenly over `rounds` (earlier rounds take the remainder);
`task_total_steps` overrides it per task (the zoo caps small tasks by epochs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

from analysis.errors import ValidationError

PROCEDURES = ("atm", "cold_fusion")
PRESETS = ("tiny", "quick", "full")
FORMAT = 1
# default merge of each procedure: ATM merges task vectors by task arithmetic (the
# paper's default); ColD Fusion's fused model is the plain average of the contributors
DEFAULT_MERGE = {"atm": "task_arithmetic", "cold_fusion": "weight_averaging"}


@dataclass(frozen=True)
class IterativeConfig:
    procedure: str                          # "atm" | "cold_fusion"
    tasks: tuple[str, ...]                  # fine-tuned (ATM) / contributing (ColD Fusion) every round
    rounds: int = 3
    total_steps: int = 60                   # per task, over all rounds
    task_total_steps: tuple[tuple[str, int], ...] = ()   # per-task overrides of total_steps
    lr: float = 1e-4
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup: float = 0.1                     # fraction of each round's steps (each round has its own schedule)
    merge_method: str = ""                  # a key of analysis.merging.METHODS; "" = the procedure's default
    merge_knobs: tuple[tuple[str, object], ...] = ()
    heldout: tuple[str, ...] = ()           # ColD Fusion: tasks never fused, probed and fine-tuned per round
    heldout_steps: int = 20                 # the short fine-tune on each held-out task
    eval_split: str = "test"
    eval_subsample: int | None = None       # examples per task scored each round (None: the whole split)
    seed: int = 0

    def __post_init__(self):
        if self.procedure not in PROCEDURES:
            raise ValidationError(f"unknown procedure {self.procedure!r}; expected one of {list(PROCEDURES)}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "heldout", tuple(self.heldout))
        object.__setattr__(self, "task_total_steps", tuple((str(t), int(s)) for t, s in dict(self.task_total_steps).items()))
        object.__setattr__(self, "merge_knobs", tuple(sorted(dict(self.merge_knobs).items())))
        if not self.merge_method:
            object.__setattr__(self, "merge_method", DEFAULT_MERGE[self.procedure])
        if not self.tasks:
            raise ValidationError(f"{self.procedure}: no tasks to fine-tune; give at least one")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValidationError(f"{self.procedure}: tasks {list(self.tasks)} name a task twice")
        if self.procedure == "atm" and self.heldout:
            raise ValidationError(f"held-out tasks {list(self.heldout)} are a ColD Fusion measurement; ATM has none")
        both = sorted(set(self.tasks) & set(self.heldout))
        if both:
            raise ValidationError(f"task(s) {both} are both fused and held out; a held-out task must not be fused")
        for name, value, low in (("rounds", self.rounds, 1), ("total_steps", self.total_steps, 1),
                                 ("batch_size", self.batch_size, 1), ("heldout_steps", self.heldout_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValidationError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.total_steps < self.rounds:
            raise ValidationError(f"total_steps = {self.total_steps} cannot give each of {self.rounds} rounds a step")
        for task, steps in self.task_total_steps:
            if steps < self.rounds:
                raise ValidationError(f"task_total_steps[{task!r}] = {steps} cannot give each of {self.rounds} "
                                      "rounds a step")
        if not (self.lr > 0):
            raise ValidationError(f"lr must be positive, got {self.lr!r}")
        if not (0 <= self.warmup < 1):
            raise ValidationError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.eval_subsample is not None and self.eval_subsample < 1:
            raise ValidationError(f"eval_subsample must be a positive number of examples or None, got {self.eval_subsample!r}")

    # ------------------------------------------------------------ budget
    def task_budget(self, task: str) -> int:
        return dict(self.task_total_steps).get(task, self.total_steps)

    def steps(self, task: str, round_: int) -> int:
        """Fine-tuning steps of `task` in round `round_` (1-based): its budget split evenly."""
        if not 1 <= round_ <= self.rounds:
            raise ValidationError(f"round {round_} is outside 1..{self.rounds}")
        total = self.task_budget(task)
        return total // self.rounds + (1 if round_ <= total % self.rounds else 0)

    def steps_done(self, task: str, round_: int) -> int:
        """Steps `task` has taken after round `round_` (0 before the first)."""
        return sum(self.steps(task, r) for r in range(1, round_ + 1))

    @property
    def knobs(self) -> dict:
        return dict(self.merge_knobs)

    # ------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task_total_steps"] = dict(self.task_total_steps)
        d["merge_knobs"] = dict(self.merge_knobs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "IterativeConfig":
        d = dict(d)
        d["task_total_steps"] = tuple(dict(d.get("task_total_steps") or {}).items())
        d["merge_knobs"] = tuple(dict(d.get("merge_knobs") or {}).items())
        return cls(**d)

    def key(self, source: str) -> str:
        """Hash of everything that changes the result: this config and the source's content key."""
        text = json.dumps({"format": FORMAT, "config": self.to_dict(), "source": source}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def round_seed(seed: int, task: str, round_: int) -> int:
    """The seed of one fine-tune: a function of (run seed, task, round) only, so the
    step order and dropout of a round never depend on what ran before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:{round_}".encode()).digest()[:4], "little")


def preset(name: str, procedure: str, tasks, build: Mapping | None = None, train_sizes: Mapping[str, int] | None = None,
           heldout=(), **overrides) -> IterativeConfig:
    """The named configurations, with the fine-tuning recipe of the build they start from.

    `build` is the zoo's BuildConfig as a dict (the demo manifest's "config"): its
    learning rate, batch size, weight decay and per-task budget (`ft_steps`, capped
    by `ft_max_epochs` on small tasks, given `train_sizes`) are reused, so ATM and
    ColD Fusion spend exactly what the build's ordinary fine-tunes spent.
    tiny: 2 rounds (tests); quick: 3 rounds (2-core CPU); full: 5 rounds.
    """
    if name not in PRESETS:
        raise ValidationError(f"unknown iterative preset {name!r}; expected one of {list(PRESETS)}")
    build = dict(build or {})
    rounds = {"tiny": 2, "quick": 3, "full": 5}[name]
    total = int(build.get("ft_steps", {"tiny": 8, "quick": 60, "full": 500}[name]))
    per_task = ()
    cap = build.get("ft_max_epochs")
    batch = int(build.get("ft_batch", 16))
    if cap is not None and train_sizes:
        per_task = tuple((t, max(rounds, min(total, int(cap * train_sizes[t] / batch)))) for t in tasks if t in train_sizes)
    fields = dict(procedure=procedure, tasks=tuple(tasks), rounds=rounds, total_steps=total, task_total_steps=per_task,
                  lr=float(build.get("ft_lr", 1e-4)), batch_size=batch,
                  weight_decay=float(build.get("weight_decay", 0.01)), heldout=tuple(heldout),
                  heldout_steps=max(1, total // rounds))
    fields.update(overrides)
    return IterativeConfig(**fields)
