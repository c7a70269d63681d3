import matplotlib.pyplot as plt

from saelab.plots import l0_vs_loss_recovered_figure, plot_l0_vs_loss_recovered


def _visible_tick_labels(fig):
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]


def test_l0_axis_is_labelled_within_one_decade():
    # the quickstart's L0s (16..67) lie inside one decade: the axis must still carry numbers
    fig = l0_vs_loss_recovered_figure({"topk": [(16, 0.97, "k16"), (32, 0.98, "k32")], "relu": [(43, 0.95), (67, 0.96)]})
    labels = _visible_tick_labels(fig)
    plt.close(fig)
    assert {"20", "50"} <= set(labels)


def test_points_are_annotated_and_png_written(tmp_path):
    fig = l0_vs_loss_recovered_figure({"topk": [(16, 0.97, "k16"), (32, 0.98, "k32")]})
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert texts == ["k16", "k32"]
    path = plot_l0_vs_loss_recovered({"a": [(5, 0.5), (500, 0.9)]}, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
