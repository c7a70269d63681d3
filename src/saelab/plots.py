"""Figures written into run folders: L0 against loss recovered, and feature-density histograms
from metrics rows (saelab.evals.entry). matplotlib's `Figure` objects, never pyplot: no
display, no global figure state, nothing to close."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from saelab.atomic import atomic_path

if TYPE_CHECKING:
    from saelab.evals.entry import MetricsEntry

Point = tuple  # (l0, loss_recovered[, label[, ce_delta[, mse]]])
# (index in a point, y-axis label, scale): loss recovered always; MSE and CE increase where points carry them
_PANELS = ((1, "% CE loss recovered", 100), (4, "MSE", 1), (3, "CE increase over the clean model (nats)", 1))


def l0_vs_loss_recovered_figure(series: dict[str, list[Point]], title: str = ""):
    """One marker series per name: L0 (log x) against % loss recovered and, when the points carry
    a CE increase, a second panel of L0 against it: "95% recovered" can still be +0.5 nats on a
    real model, whose zero-ablation CE is far above unigram; when they carry an MSE (fifth
    element), a panel of L0 against it too. A point's optional third element (e.g. "k32",
    "L1 2") is written beside it, so a reader can tell the SAEs apart."""
    from matplotlib.figure import Figure

    panels = [p for p in _PANELS
              if p[0] == 1 or any(len(q) > p[0] and q[p[0]] is not None for pts in series.values() for q in pts)]
    fig = Figure(figsize=(6 * len(panels), 4.2), dpi=120)
    for ax, (index, ylabel, scale) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _l0_panel(ax, series, index, ylabel, scale)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _l0_panel(ax, series: dict[str, list[Point]], index: int, ylabel: str, scale: float) -> None:
    import matplotlib.ticker as ticker

    for (name, points), marker in zip(series.items(), "osD^v<>"):
        points = sorted(p for p in points if p[0] is not None and len(p) > index and p[index] is not None)
        if not points:
            continue
        xs, ys = [p[0] for p in points], [scale * p[index] for p in points]
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
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def density_histograms_figure(rows: list[MetricsEntry]):
    """One panel per SAE: the log10 feature-density histogram of its metrics row, the dense
    threshold marked: the spike of high-frequency features the seeds prune shows here. Dead
    features sit in the leftmost bin."""
    import math

    from matplotlib.figure import Figure

    cols = min(4, len(rows))
    n_rows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * n_rows), dpi=110)
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, row in zip(axes.flat, rows):
        m = row.recon
        edges, counts = m.density_hist_edges, m.density_hist_counts
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c78a8")
        ax.axvline(math.log10(m.dense_threshold), color="#c44", lw=1, ls="--")
        ax.set_title(f"{row.name}  dead {m.dead}  dense {m.dense}", fontsize=8)
        ax.set_xlabel("log10 feature density", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Write a figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def plot_l0_vs_loss_recovered(series: dict[str, list[Point]], path: str | Path, title: str = "") -> Path:
    """Write `l0_vs_loss_recovered_figure` as a PNG, atomically."""
    return save_figure(l0_vs_loss_recovered_figure(series, title), path)
