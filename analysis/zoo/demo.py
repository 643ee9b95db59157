"""The Demo object: everything the app needs from a finished build."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.evaluation import Evaluator
from analysis.taskvectors import TaskVectorSet
from analysis.zoo.builder import build, find_build, load_backbone, load_encoded, load_head, preset
from analysis.zoo.data import cards_table


@dataclass
class Demo:
    """A built benchmark.

    tvs: task vectors of the text backbone (fine-tuned - pretrained), one per task;
    evaluator: scores any backbone on every task with the frozen per-task heads;
    reference: task, model (zero_shot | fine_tuned), split, metric, value, n;
    cards: {task: data card}; mnist_paths: MLP checkpoints, one per seed.
    """

    root: Path
    manifest: dict
    tvs: TaskVectorSet
    evaluator: Evaluator
    reference: pd.DataFrame
    cards: dict
    mnist_paths: list[Path] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def base_path(self) -> Path:
        return self.root / "pretrained"

    @property
    def finetuned_paths(self) -> dict[str, Path]:
        return {t: self.root / "tasks" / t / "finetuned" for t in self.tasks}

    @property
    def head_paths(self) -> dict[str, Path]:
        return {t: self.root / "tasks" / t / "head.safetensors" for t in self.tasks}

    @property
    def mnist_dataset(self) -> str | None:
        return self.manifest["config"].get("mnist_dataset")

    @property
    def export_fill(self) -> list[Path]:
        """Checkpoints holding tensors `transformers.AutoModel` expects that the backbone was saved
        without: the pooler of the MiniLM the build started from (the heads read mean-pooled token
        states, so fine-tuning never changed it). See `analysis.report.write_hf_model`."""
        if self.manifest.get("config", {}).get("backbone") != "minilm":
            return []  # the tiny test backbone was made without a pooler: there is none to copy
        from analysis.errors import CheckpointError
        from analysis.zoo.sources import minilm_folder
        try:
            return [minilm_folder()]
        except CheckpointError:
            return []

    def cards_table(self) -> pd.DataFrame:
        return cards_table(self.cards)

    def reference_accuracy(self, split: str = "test") -> pd.DataFrame:
        """task x model (zero_shot, fine_tuned) accuracy table."""
        from analysis.merging.scoring import reference_accuracy
        return reference_accuracy(self.reference, split).reindex(self.tasks)


def open_demo(root: str | Path, device=None) -> Demo:
    """Load a finished build folder. Its task vectors are resident on `device`
    (see TaskVectorSet.keep_resident): read once, on first use."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    tasks = manifest["tasks"]
    tdir = root / "tasks"
    tvs = TaskVectorSet.from_checkpoints(root / "pretrained", {t: tdir / t / "finetuned" for t in tasks})
    # read and validated once, then kept stacked on the device: a slider move never re-reads a checkpoint
    tvs.keep_resident(device)
    data = {t: load_encoded(tdir / t / "data.safetensors") for t in tasks}
    heads = {t: load_head(tdir / t / "head.safetensors") for t in tasks}
    evaluator = Evaluator(load_backbone(root / "pretrained"), data, heads, device=device)
    rows = []
    for t in tasks:
        rows += json.loads((tdir / t / "reference.json").read_text())
    reference = pd.DataFrame(rows, columns=["task", "model", "split", "metric", "value", "n"])
    cards = {t: json.loads((tdir / t / "card.json").read_text()) for t in tasks}
    mnist = sorted((root / "mnist").glob("seed_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    return Demo(root, manifest, tvs, evaluator, reference, cards, mnist)


def load_demo(cache_dir: str | Path | None = None, quick: bool | None = None, device=None) -> Demo:
    """The built benchmark in `cache_dir` (default $MERGESCOPE_CACHE or ~/.cache/mergescope).

    quick=True: the --quick build; False: the full build; None: any finished
    build (full preferred). Raises DemoNotBuilt when there is none.
    """
    return open_demo(find_build(cache_dir, quick), device=device)


def build_tiny_demo(cache_dir: str | Path, device=None, progress=None) -> Demo:
    """A seconds-on-CPU demo for tests: a random 2-layer BERT (hidden 32), three
    toy keyword tasks, three MLPs on sklearn's digits. Same interface as load_demo."""
    config = preset("tiny")
    root = build(config, cache_dir, progress=progress)
    return open_demo(root, device=device)
