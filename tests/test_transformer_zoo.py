"""The transformer zoo's tiny preset: built through the same cache and
command as the demo, loads back, learns the toy tasks from scratch, and its
models fit the BERT permutation spec."""
from __future__ import annotations

import pytest
import torch

from analysis.permutation.transformer import bert_spec, evaluate_heads
from analysis.zoo import DemoNotBuilt
from analysis.zoo.__main__ import main
from analysis.zoo.transformers import find_transformer_zoo, load_transformer_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_zoo_builds_loads_and_beats_the_majority_class(tmp_path, capsys):
    with pytest.raises(DemoNotBuilt, match="build-transformers"):
        find_transformer_zoo(tmp_path)
    assert main(["build-transformers", "--tiny", "--cache-dir", str(tmp_path)]) == 0
    assert "transformers-tiny-" in capsys.readouterr().out
    zoo = load_transformer_zoo(tmp_path)
    assert zoo.root.name.startswith("transformers-tiny-") and list(zoo.models) == ["seed 0", "seed 1", "seed 2"]
    assert not any(p.name.startswith("zoo-") for p in tmp_path.iterdir())  # never mistaken for the demo
    test = zoo.split("test")
    majority = zoo.manifest["majority_test_accuracy"]
    for name, sd in zoo.models.items():
        spec = bert_spec(sd, zoo.n_heads)
        assert {"res", "l0.qk", "l0.vo", "l0.ffn"} == set(spec.groups)
        for task in zoo.tasks:
            acc = evaluate_heads(sd, {task: test[task]}, zoo.n_heads, zoo.eps, device="cpu")["accuracy"]
            assert acc > majority[task] + 0.2, (name, task, acc, majority[task])
    a, b = zoo.models["seed 0"], zoo.models["seed 1"]
    assert not torch.allclose(a["encoder.layer.0.intermediate.dense.weight"],
                              b["encoder.layer.0.intermediate.dense.weight"])
    # a second build call finds the finished folder instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in zoo.root.rglob("*")}
    assert main(["build-transformers", "--tiny", "--cache-dir", str(tmp_path)]) == 0
    assert "already built" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in zoo.root.rglob("*")} == stamps
