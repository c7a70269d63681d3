"""Figures written into run folders (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from saelab.atomic import atomic_path


def plot_l0_vs_loss_recovered(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "") -> Path:
    """One marker series per name: L0 (log x) against % loss recovered, each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for (name, points), marker in zip(series.items(), "osD^v<>"):
        points = sorted(p for p in points if p[0] is not None and p[1] is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], marker=marker, linestyle="-" if len(points) > 1 else "", label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("% CE loss recovered")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
