import itertools
import math

import pytest

from saelab.evals.entry import MetricsEntry
from saelab.evals.metrics import SAEMetrics
from saelab.plots import (density_histograms_figure, histogram_range, l0_vs_loss_recovered_figure, live_counts,
                          plot_l0_vs_loss_recovered, save_figure)


def _visible_tick_labels(fig):
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]


def test_l0_axis_is_labelled_within_one_decade():
    # the quickstart's L0s (16..67) lie inside one decade: the axis must still carry numbers
    fig = l0_vs_loss_recovered_figure({"topk": [(16, 0.97, "k16"), (32, 0.98, "k32")], "relu": [(43, 0.95), (67, 0.96)]})
    labels = _visible_tick_labels(fig)
    assert {"20", "50"} <= set(labels)


def test_points_are_annotated_and_png_written(tmp_path):
    fig = l0_vs_loss_recovered_figure({"topk": [(16, 0.97, "k16"), (32, 0.98, "k32")]})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["k16", "k32"]
    path = plot_l0_vs_loss_recovered({"a": [(5, 0.5), (500, 0.9)]}, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_density_histograms_show_each_saes_counts(tmp_path):
    edges = [-10 + 0.5 * i for i in range(21)]
    rows = [MetricsEntry(f"s{n}", SAEMetrics(n_tokens=10, mse=1.0, fvu=0.5, explained_variance=0.5, cos=0.7,
                                             dead=n, dense=2 * n, dense_threshold=0.05, density_hist_edges=edges,
                                             density_hist_counts=[n + i for i in range(20)])) for n in range(5)]
    fig = density_histograms_figure(rows)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 5 and len(fig.axes) == 8  # 4 columns, 2 rows, 3 empty panels hidden
    for ax, row in zip(panels, rows):
        counts = row.recon.density_hist_counts
        assert [p.get_height() for p in ax.patches] == [counts[0] - row.recon.dead, *counts[1:]]  # dead: in the title
        assert ax.get_ylabel() == "features"
        assert ax.get_title() == f"{row.name}  dead {row.recon.dead}  dense {row.recon.dense}"
        assert ax.lines[0].get_xdata()[0] == math.log10(0.05)
    assert save_figure(fig, tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_ce_increase_gets_its_own_panel_when_points_carry_it():
    fig = l0_vs_loss_recovered_figure({"topk": [(16, 0.97, "k16", 0.12), (32, 0.98, "k32", 0.05)]}, title="t")
    assert len(fig.axes) == 2
    assert fig.axes[1].get_ylabel().startswith("CE increase") and fig.axes[0].get_ylabel() == "% CE loss recovered"
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[0.12, 0.05]]
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[97.0, 98.0]]
    assert len(l0_vs_loss_recovered_figure({"a": [(5, 0.5, "x", None)]}).axes) == 1


def test_crowded_point_labels_do_not_overlap_each_other_or_the_markers():
    # a sweep whose points nearly coincide: labels at one fixed offset would print over each other
    series = {"relu x4": [(40 + i, 0.95 + 0.001 * i, f"c{i}") for i in range(6)],
              "topk x4": [(41 + i, 0.951 + 0.001 * i, f"k{8 * (i + 1)}") for i in range(6)]}
    fig = l0_vs_loss_recovered_figure(series, title="t", note="evaluated on 64 held-out contexts")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(p[2] for pts in series.values() for p in pts)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), "two point labels overlap"
    markers = [ax.transData.transform(p[:2]) for pts in series.values() for p in pts]
    for box in boxes:
        assert not any(box.contains(x, y) for x, y in markers), "a label covers a marker"
    assert "64 held-out contexts" in fig._suptitle.get_text()


def test_density_histogram_range_fits_the_live_features():
    edges = [-10 + 0.5 * i for i in range(21)]  # bins of 0.5 from -10 to 0
    counts = live_counts([7] + [0] * 11 + [3, 5, 2] + [0] * 5, dead=7)  # 7 dead, live ones in [-4, -2.5)
    assert counts[0] == 0 and sum(counts) == 10
    assert histogram_range(edges, counts) == (-4.5, -2.0)  # one bin of margin each side
    assert histogram_range(edges, counts, mark=-1.0) == (-4.5, -0.5)  # the dense threshold stays in view
    assert histogram_range(edges, [0] * 20) == (-10, 0)
    rows = [MetricsEntry("s", SAEMetrics(n_tokens=10, mse=1.0, fvu=0.5, explained_variance=0.5, cos=0.7, dead=7,
                                         dense=0, dense_threshold=0.1, density_hist_edges=edges,
                                         density_hist_counts=[7] + [0] * 11 + [3, 5, 2] + [0] * 5))]
    assert density_histograms_figure(rows).axes[0].get_xlim() == pytest.approx((-4.5, -0.5))
