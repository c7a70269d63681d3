"""Figures written into run folders (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from saelab.atomic import atomic_path

Point = tuple  # (l0, loss_recovered) or (l0, loss_recovered, label)


def l0_vs_loss_recovered_figure(series: dict[str, list[Point]], title: str = ""):
    """One marker series per name: L0 (log x) against % loss recovered. A point's optional third
    element (e.g. "k32", "L1 2") is written beside it, so a reader can tell the SAEs apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for (name, points), marker in zip(series.items(), "osD^v<>"):
        points = sorted(p for p in points if p[0] is not None and p[1] is not None)
        if not points:
            continue
        xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
        ax.plot(xs, ys, marker=marker, linestyle="-" if len(points) > 1 else "", label=name)
        for p, y in zip(points, ys):
            if len(p) > 2 and p[2]:
                ax.annotate(str(p[2]), (p[0], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    # L0 sweeps often span less than a decade: ticks at 1-2-5 steps keep labels on the axis
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("% CE loss recovered")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_l0_vs_loss_recovered(series: dict[str, list[Point]], path: str | Path, title: str = "") -> Path:
    """Write `l0_vs_loss_recovered_figure` as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = l0_vs_loss_recovered_figure(series, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
