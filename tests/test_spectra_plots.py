"""Figures for spectra and interference: the right traces, axes and colours."""
from __future__ import annotations

import pytest
import torch

from analysis.interference import cosine_table, pairwise_sti_table, sign_conflict_table, sti_table, task_pair_stats
from analysis.plots import task_color
from analysis.plots.spectra import (effective_rank_figure, energy_figure, pair_depth_heatmap, spectrum_figure,
                                    sti_depth_figure, task_heatmap)
from analysis.spectra import SpectralCache, effective_rank_table, energy_table, singular_values_table
from analysis.taskvectors import TaskVectorSet

TASKS = ("a", "b", "c")


def _cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.{p}": torch.zeros(10, 6) for i in range(2) for p in ("q.weight", "o.weight")}
    tvs = TaskVectorSet.from_state_dicts(base, {t: {k: torch.randn(10, 6, generator=g) for k in base} for t in TASKS})
    return SpectralCache(tvs, device="cpu", cache_dir=tmp_path)


def test_spectrum_figure_log_axis_task_colours_and_layer_chooser(tmp_path):
    cache = _cache(tmp_path)
    sv = singular_values_table(cache)
    fig = spectrum_figure(sv, "layers.1.q.weight", list(TASKS))
    assert fig.layout.yaxis.type == "log" and [t.name for t in fig.data] == list(TASKS)
    assert [t.line.color for t in fig.data] == [task_color(t, TASKS) for t in TASKS]
    assert list(fig.data[0].y) == sv[(sv.param == "layers.1.q.weight") & (sv.task == "a")]["sigma"].tolist()
    assert "σ" in fig.layout.yaxis.title.text and "index" in fig.layout.xaxis.title.text
    chooser = spectrum_figure(sv, tasks=list(TASKS), params=cache.names)
    assert len(chooser.data) == 3 * len(cache.names)
    buttons = chooser.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == cache.names
    assert sum(buttons[2].args[0]["visible"]) == 3 and buttons[2].args[0]["visible"][6]


def test_energy_and_effective_rank_figures(tmp_path):
    cache = _cache(tmp_path)
    fig = energy_figure(energy_table(cache, [0.25, 0.5, 1.0]), None, list(TASKS), rank_fraction=0.5)
    assert len(fig.data) == 3 and list(fig.data[0].x) == [25.0, 50.0, 100.0] and fig.data[0].y[-1] == 100.0
    assert "%" in fig.layout.xaxis.title.text and "%" in fig.layout.yaxis.title.text
    er = effective_rank_figure(effective_rank_table(cache), list(TASKS))
    assert list(er.data[0].x) == [0, 1]


def test_interference_figures(tmp_path):
    cache = _cache(tmp_path)
    sti = sti_table(cache.tvs, 0.5, cache=cache)
    fig = sti_depth_figure(sti)
    assert {t.name for t in fig.data} == {"q.weight", "o.weight"} and "depth" in fig.layout.xaxis.title.text
    pairs = pairwise_sti_table(cache.tvs, 0.5, cache=cache)
    heat = pair_depth_heatmap(pairs, "sti", list(TASKS))
    assert sorted(heat.data[0].y) == ["a × b", "a × c", "b × c"]     # one horizontal row per pair
    assert list(heat.data[0].x) == [0, 1]                             # one column per block
    # STI is additive: a block's cell is the sum over its layers
    ab = pairs[(pairs.task == "a") & (pairs.task_b == "b") & (pairs.depth == 0)]["sti"].sum()
    row = list(heat.data[0].y).index("a × b")
    assert heat.data[0].z[row][0] == pytest.approx(ab)
    with pytest.raises(ValueError, match="not additive"):
        pair_depth_heatmap(cosine_table(task_pair_stats(cache.tvs, device="cpu"), "param"), "cosine", list(TASKS))
    stats = task_pair_stats(cache.tvs, device="cpu")
    cos = task_heatmap(cosine_table(stats), "cosine", list(TASKS))
    z = cos.data[0].z
    assert z[0][0] == pytest.approx(1.0) and cos.data[0].zmid == 0.0
    conf = task_heatmap(sign_conflict_table(stats), "conflict_rate", list(TASKS))
    assert conf.data[0].z[1][1] != conf.data[0].z[1][1]   # the diagonal is blank (NaN)
