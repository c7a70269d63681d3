"""Figures written into run folders: L0 against loss recovered, and feature-density histograms
from metrics rows (saelab.evals.entry). matplotlib's `Figure` objects, never pyplot: no
display, no global figure state, nothing to close. Point labels are placed where they overlap
no other label and no marker (`place_labels`)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

from saelab.atomic import atomic_path

if TYPE_CHECKING:
    from saelab.evals.entry import MetricsEntry

Point = tuple  # (l0, loss_recovered[, label[, ce_delta[, mse]]])
# (index in a point, y-axis label, scale): loss recovered always; MSE and CE increase where points carry them
_PANELS = ((1, "% CE loss recovered", 100), (4, "MSE", 1), (3, "CE increase over the clean model (nats)", 1))


def l0_vs_loss_recovered_figure(series: dict[str, list[Point]], title: str = "", note: str = ""):
    """One marker series per name: L0 (log x) against % loss recovered and, when the points carry
    a CE increase, a second panel of L0 against it: "95% recovered" can still be +0.5 nats on a
    real model, whose zero-ablation CE is far above unigram; when they carry an MSE (fifth
    element), a panel of L0 against it too. A point's optional third element (e.g. "k32",
    "L1 2") is written beside it, so a reader can tell the SAEs apart; labels are placed apart
    (`place_labels`). `note`: a line under the title, e.g. what the points were evaluated on."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in _PANELS
              if p[0] == 1 or any(len(q) > p[0] and q[p[0]] is not None for pts in series.values() for q in pts)]
    fig = Figure(figsize=(6 * len(panels), 4.2 + 0.3 * bool(note)), dpi=120)
    FigureCanvasAgg(fig)  # a renderer to measure the labels with
    labels = [_l0_panel(ax, series, index, ylabel, scale)
              for ax, (index, ylabel, scale) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels)]
    if title or note:
        fig.suptitle("\n".join(t for t in (title, note) if t), fontsize=10 if not note else 9)
    fig.tight_layout()
    for ax, items in zip(fig.axes, labels):
        place_labels(ax, items)
    return fig


def _l0_panel(ax, series: dict[str, list[Point]], index: int, ylabel: str, scale: float) -> list[tuple]:
    """Draw one panel's series; returns the (x, y, label) of its labelled points, to place later."""
    import matplotlib.ticker as ticker

    labels = []
    for (name, points), marker in zip(series.items(), itertools.cycle("osD^v<>p*hX")):
        points = sorted(p for p in points if p[0] is not None and len(p) > index and p[index] is not None)
        if not points:
            continue
        xs, ys = [p[0] for p in points], [scale * p[index] for p in points]
        ax.plot(xs, ys, marker=marker, linestyle="-" if len(points) > 1 else "", label=name)
        labels += [(p[0], y, str(p[2])) for p, y in zip(points, ys) if len(p) > 2 and p[2]]
    ax.set_xscale("log")
    # L0 sweeps often span less than a decade: ticks at 1-2-5 steps keep labels on the axis
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return labels


# label offsets tried in turn (points from the marker): the nearest ring first, right before left
_RINGS = (6, 12, 20, 30, 42)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def place_labels(ax, items: list[tuple], fontsize: float = 7) -> list:
    """Annotate each (x, y, text) of `ax` (data coordinates) at the first offset, nearest first,
    where its text overlaps no label placed before it, no labelled marker, and stays inside the
    axes; a label moved beyond the first ring gets a thin line to its point. Where no offset is
    free, the one with the least overlap is taken. Call after the layout is final (the test is in
    display pixels). Returns the annotations, in the order of `items`."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    size = fontsize * ax.figure.dpi / 72
    taken = [_box(*ax.transData.transform((x, y)), size / 2) for x, y, _ in items]  # the markers
    placed = []
    for x, y, text in items:
        best = None
        for radius, (dx, dy) in itertools.product(_RINGS, _DIRECTIONS):
            note = _label(ax, x, y, text, radius, dx, dy, fontsize)
            bb = note.get_window_extent(renderer)
            cost = sum(_overlap(bb, t) for t in taken) + _outside(bb, frame)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, radius, dx, dy)
            else:
                note.remove()
            if cost == 0:
                break
        cost, note, radius, dx, dy = best
        if radius > _RINGS[0]:
            note.remove()
            note = _label(ax, x, y, text, radius, dx, dy, fontsize, leader=True)
        taken.append(note.get_window_extent(renderer))
        placed.append(note)
    return placed


def _label(ax, x, y, text, radius, dx, dy, fontsize, leader=False):
    norm = math.hypot(dx, dy)
    ha = {1: "left", 0: "center", -1: "right"}[dx]
    va = {1: "bottom", 0: "center", -1: "top"}[dy]
    arrow = dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if leader else None
    return ax.annotate(text, (x, y), textcoords="offset points", xytext=(radius * dx / norm, radius * dy / norm),
                       fontsize=fontsize, ha=ha, va=va, arrowprops=arrow)


def _box(px: float, py: float, half: float):
    from matplotlib.transforms import Bbox

    return Bbox([[px - half, py - half], [px + half, py + half]])


def _overlap(a, b) -> float:
    """Area (pixels) shared by two boxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(bb, frame) -> float:
    """Area (pixels) of `bb` outside the axes `frame`, weighted so leaving the axes costs more."""
    return 4 * (bb.width * bb.height - _overlap(bb, frame))


def density_histograms_figure(rows: list[MetricsEntry]):
    """One panel per SAE: the log10 feature-density histogram of its metrics row, the dense
    threshold marked: the spike of high-frequency features the seeds prune shows here. Dead
    features (counted in the histogram's first bin, at the floor of 1e-10) are counted in the
    title instead, so the x-range spans the live features' densities and the threshold."""
    from matplotlib.figure import Figure

    cols = min(4, len(rows))
    n_rows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * n_rows), dpi=110)
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, row in zip(axes.flat, rows):
        m = row.recon
        edges, counts = m.density_hist_edges, live_counts(m.density_hist_counts, m.dead)
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c78a8")
        threshold = math.log10(m.dense_threshold)
        ax.axvline(threshold, color="#c44", lw=1, ls="--")
        ax.set_xlim(*histogram_range(edges, counts, threshold))
        ax.set_title(f"{row.name}  dead {m.dead}  dense {m.dense}", fontsize=8)
        ax.set_xlabel("log10 feature density (live features)", fontsize=7)
        ax.set_ylabel("features", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def live_counts(counts: list[int], dead: int | None) -> list[int]:
    """A density histogram's counts without the dead features, which `density_histogram` puts
    in the first bin (a density of 0 is floored there)."""
    counts = list(counts)
    if counts and dead:
        counts[0] = max(0, counts[0] - dead)
    return counts


def histogram_range(edges: list[float], counts: list[int], mark: float | None = None) -> tuple[float, float]:
    """x-limits that fit the bins holding features (and `mark`, e.g. the dense threshold), one
    bin of margin each side; the whole range when every bin is empty."""
    filled = [i for i, c in enumerate(counts) if c]
    if not filled:
        return edges[0], edges[-1]
    lo, hi = edges[filled[0]], edges[filled[-1] + 1]
    if mark is not None:
        lo, hi = min(lo, mark), max(hi, mark)
    pad = edges[1] - edges[0]
    return max(edges[0], lo - pad), min(edges[-1], hi + pad)


def save_figure(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Write a figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def plot_l0_vs_loss_recovered(series: dict[str, list[Point]], path: str | Path, title: str = "",
                              note: str = "") -> Path:
    """Write `l0_vs_loss_recovered_figure` as a PNG, atomically."""
    return save_figure(l0_vs_loss_recovered_figure(series, title, note), path)
