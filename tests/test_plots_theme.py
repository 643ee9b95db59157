"""The shared plot theme and its helpers: one look, legends clear of titles,
axes that fit the data, clustered orders, percent tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.plots import apply_theme, cluster_order, data_range, wrap_label
from analysis.plots.merge import accuracy_bars
from analysis.plots.report import grouped_bars, radar
from analysis.plots.spectra import task_heatmap
from analysis.report import comparison_table, export_status, wide_table

TASKS = ["a", "b", "c", "d"]


def _comparison():
    hist = [{"method": "task_arithmetic", "knobs": {"alpha": 0.3}, "split": "test",
             "per_task": {"a": 0.81, "b": 0.83, "c": 0.79, "d": 0.85}},
            {"method": "tsv_m", "knobs": {"alpha": 1.0, "rank_fraction": 0.125}, "split": "test",
             "per_task": {"a": 0.84, "b": 0.82, "c": 0.80, "d": 0.86}}]
    ref = pd.DataFrame([{"task": t, "model": m, "split": "test", "metric": "accuracy", "value": v}
                        for t in TASKS for m, v in (("zero_shot", 0.72), ("fine_tuned", 0.9))])
    return comparison_table(hist, ref, split="test")


def _legend_clear_of_title(fig):
    """The legend sits right of the plot area (x > 1, left-anchored) and the title in the container's top margin."""
    ok, why = export_status()   # plotly.js computes the full layout through kaleido and a local browser
    if not ok:
        pytest.skip(f"the full layout needs kaleido and a browser: {why}")
    full = fig.full_figure_for_development(warn=False)
    legend, title = full.layout.legend, full.layout.title
    assert title.yref == "container" and title.automargin
    if full.layout.showlegend is False:   # one trace, no legend drawn (plotly's default): nothing to collide
        return
    assert legend.x >= 1.0 and legend.xanchor == "left" and legend.orientation == "v"
    assert title.yref == "container" and title.automargin


@pytest.mark.parametrize("build", [
    lambda: grouped_bars(_comparison(), "accuracy", TASKS),
    lambda: radar(_comparison(), "accuracy", TASKS),
    lambda: accuracy_bars(pd.DataFrame({"task": ["a", "a"], "model": ["fine_tuned", "merged"],
                                        "accuracy": [0.9, 0.8], "normalized": [1.0, 0.8 / 0.9]}))])
def test_every_figure_has_the_shared_look(build):
    fig = build()
    assert fig.layout.template.layout.font.family.startswith("Inter")
    _legend_clear_of_title(fig)


def test_apply_theme_resets_a_builders_legend_and_keeps_title_and_subtitle():
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(y=[1, 2], name="x"))
    fig.update_layout(legend=dict(y=1.12, orientation="h"), margin=dict(t=150))
    apply_theme(fig, title="A title", subtitle="a subtitle")
    assert fig.layout.legend.y is None and fig.layout.margin.t is None   # the template's, not the builder's
    assert fig.layout.title.text == "A title" and fig.layout.title.subtitle.text == "a subtitle"


@pytest.mark.parametrize("subtitle", [None, "a subtitle"])
def test_title_and_subtitle_stay_clear_of_the_panel_titles(subtitle):
    """Panel titles (make_subplots) sit above the plot, in the margin the title's automargin reserves for
    itself: drawn, the title's (and subtitle's) last line must end above them (they overlapped on the Loss
    Landscape and the Alignment page)."""
    import re

    from analysis.plots.landscape import path_figure
    from analysis.report import figure_bytes
    ok, why = export_status()
    if not ok:
        pytest.skip(f"drawing the figure needs kaleido and a browser: {why}")
    rows = [{"lam": lam, "task": "a", "metric": metric, "value": 0.5}
            for lam in (0.0, 0.5, 1.0) for metric in ("loss", "accuracy")]
    svg = figure_bytes(path_figure(pd.DataFrame(rows), ["a"], "lam", title="A → B", subtitle=subtitle),
                       "svg", width=1000).decode()
    last = re.search(r'<text class="%s"[^>]* y="([0-9.]+)"[^>]*font-size: ([0-9.]+)px'
                     % ("gtitle-subtitle" if subtitle else "gtitle"), svg)
    panels = [float(y) for y in re.findall(
        r'<g class="annotation-text-g"[^>]*><g class="cursor-pointer" transform="translate\([0-9.]+,([0-9.]+)\)', svg)]
    assert last is not None and len(panels) == 2
    bottom = float(last.group(1)) + 1.3 * float(last.group(2))   # its baseline is one em below y
    assert bottom <= min(panels)


def test_data_range_fits_the_data_not_zero_to_hundred():
    assert data_range([81.3, 81.2, 84.0, 79.5], step=5) == [70.0, 90.0]
    assert data_range([99.0, 97.0], ceiling=100.0, step=5) == [90.0, 100.0]
    assert data_range([-12.0, 30.0], floor=None, step=5) == [-20.0, 35.0]
    assert data_range([], floor=0.0, ceiling=100.0) == [0.0, 100.0]


def test_report_bars_and_radar_rescale_to_the_data():
    comp = _comparison()
    bars = grouped_bars(comp, "accuracy", TASKS)
    lo, hi = bars.layout.yaxis.range
    assert 0 < lo <= 72 and 90 <= hi <= 100                # zero-shot at 72 %, fine-tuned at 90 %
    assert max(max(t.y) for t in bars.data) == pytest.approx(90.0)   # values in %, not fractions
    rad = radar(comp, "accuracy", TASKS)
    assert list(rad.layout.polar.radialaxis.range) == [lo, hi]
    assert f"{lo:g} %" in rad.layout.title.subtitle.text


def test_merge_bars_label_each_bar_without_overlap():
    table = pd.DataFrame({"task": ["a", "a", "b", "b"], "model": ["fine_tuned", "merged"] * 2,
                          "accuracy": [0.813, 0.812, 0.9, 0.85], "normalized": [1.0, 0.999, 1.0, 0.944]})
    fig = accuracy_bars(table)
    for bar in fig.data:
        assert bar.texttemplate == "%{y:.1f}" and bar.textposition == "inside" and bar.textangle == -90
    assert fig.layout.template.layout.uniformtext.mode == "hide"   # a label that does not fit is hidden
    assert fig.layout.yaxis.range[0] > 0                            # 81.3 vs 81.2 stays visible


def test_wrap_label_breaks_long_legend_entries():
    text = "#3 tsv_m (alpha=1, rank_fraction=0.125, overflow=cap, include_embeddings=False) [subsample 64]"
    lines = wrap_label(text, 36).split("<br>")
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    assert " ".join(lines) == text
    assert wrap_label("short") == "short"


def test_cluster_order_groups_similar_rows():
    # two clear groups, interleaved in the input: {0, 2, 4} near 0, {1, 3} near 10
    rows = np.array([[0.0, 0.1], [10.0, 10.2], [0.2, 0.0], [10.1, 9.9], [0.1, 0.2]])
    order = cluster_order(rows)
    assert sorted(order) == [0, 1, 2, 3, 4]
    groups = [{0, 2, 4}, {1, 3}]
    assert [set(order[:3]), set(order[3:])] == groups or [set(order[:2]), set(order[2:])] == groups[::-1]
    assert cluster_order(np.zeros((2, 2))) == [0, 1]


def test_task_heatmap_is_clustered_and_sized_to_the_task_count():
    # a, c alike and b, d alike: clustering puts each pair side by side
    cos = {("a", "c"): 0.9, ("b", "d"): 0.9, ("a", "b"): -0.2, ("a", "d"): -0.2, ("c", "b"): -0.2, ("c", "d"): -0.2}
    rows = [{"task": x, "task_b": y, "cosine": 1.0 if x == y else cos.get((x, y), cos.get((y, x)))}
            for x in TASKS for y in TASKS]
    fig = task_heatmap(pd.DataFrame(rows), "cosine", TASKS)
    order = list(fig.data[0].x)
    assert abs(order.index("a") - order.index("c")) == 1 and abs(order.index("b") - order.index("d")) == 1
    assert list(fig.data[0].y) == order
    big = task_heatmap(pd.DataFrame([{"task": f"t{i}", "task_b": f"t{j}", "cosine": float(i == j)}
                                     for i in range(16) for j in range(16)]), "cosine")
    assert big.layout.height > fig.layout.height and big.data[0].texttemplate is None   # no numbers past 12 tasks


def test_wide_table_in_percent_matches_its_heading():
    comp = _comparison()
    frac = wide_table(comp, "accuracy", TASKS)
    pct = wide_table(comp, "accuracy", TASKS, percent=True)
    assert np.allclose(pct[TASKS + ["mean"]].to_numpy(), 100 * frac[TASKS + ["mean"]].to_numpy())
    assert pct.set_index("config").loc["fine-tuned", "mean"] == pytest.approx(90.0)


def test_apply_theme_sets_the_validated_template_unshared():
    """The template goes in without plotly re-validating it: the figure is the one a validated
    assignment gives, and changing a figure's template leaves the shared one alone."""
    import plotly.graph_objects as go

    from analysis.plots import TEMPLATE
    fig = apply_theme(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), title="t")
    slow = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    slow.update_layout(template=TEMPLATE, height=520, title_text="t")
    slow.layout.legend, slow.layout.margin = None, None
    assert fig.to_plotly_json() == slow.to_plotly_json()
    before = TEMPLATE.to_plotly_json()
    fig.layout.template.layout.font.size = 99
    assert TEMPLATE.to_plotly_json() == before


def test_figures_built_unchecked_are_what_plotly_checks_them_to_be():
    """path_figure skips plotly's per-property checks on the way in: rebuilding its figure with the
    checks on raises on any invalid property and gives the same JSON."""
    import json

    import plotly.graph_objects as go

    from analysis.plots.landscape import path_figure
    curves = pd.DataFrame([{"task": t, "metric": m, "lam": lam, "value": 0.1 * i + lam}
                           for i, t in enumerate(TASKS) for m in ("loss", "accuracy") for lam in (0.0, 0.5, 1.0)])
    fig = path_figure(curves, TASKS, title="a path", subtitle="sub", start_label="θ₀", end_label="merged")
    assert json.loads(go.Figure(fig.to_dict()).to_json()) == json.loads(fig.to_json())
    assert [t.xaxis for t in fig.data] == ["x"] * 4 + ["x2"] * 4 and fig.layout.xaxis2.ticktext[-1] == "1<br>merged"
    with pytest.raises(ValueError):
        fig.update_layout(not_a_property=1)    # checked again after construction


def test_spectra_and_interference_figures_keep_legends_clear_of_titles(tiny_workspace):
    """The pages' figures with legends (Spectra: spectrum, energy, effective rank; Interference: STI and SAR
    by depth), from a real spectral cache of the tiny set."""
    from analysis.interference import sar_by, sti_tables, subspace_alignment_table
    from analysis.plots.spectra import (effective_rank_figure, energy_figure, sar_depth_figure, spectrum_figure,
                                        sti_depth_figure)
    from analysis.spectra import SpectralCache, effective_rank_table, energy_table, singular_values_table
    tvs = tiny_workspace.tvs
    cache = SpectralCache(tvs).compute()
    tasks, layer = cache.tasks, cache.names[0]
    sti, _ = sti_tables(tvs, 0.5, cache=cache)
    sar = sar_by(subspace_alignment_table(tvs, cache=cache, energy=0.95), "depth")
    figures = {"spectrum": spectrum_figure(singular_values_table(cache), layer, tasks),
               "energy": energy_figure(energy_table(cache, [0.25, 0.5, 1.0]), layer, tasks, rank_fraction=0.5),
               "effective rank": effective_rank_figure(effective_rank_table(cache), tasks),
               "STI by depth": sti_depth_figure(sti), "SAR by depth": sar_depth_figure(sar, tasks)}
    for name, fig in figures.items():
        assert fig.layout.title.text, name
        _legend_clear_of_title(fig)
