"""The feature count's table, its estimate in words, and its figures (`saelab count`).

count.png: matched features against width per knob, with the fitted curve, the estimate and
(toy) the true number. With several knobs a second panel is the interim report's recovery plot:
MMCS against the knob per width, against the true features on toy data and against the widest
dictionary on a language model (its stand-in for the truth). `plot_beside` puts an LM's and a
toy run's recovery panels side by side, as seed 001's notes compare them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saelab.experiments.count import CountResult, KnobCount
from saelab.experiments.saturation import SATURATED, soft_min
from saelab.plots import save_figure
from saelab.tables import Column, format_rows

TABLE = (Column("knob"), Column("width"), Column("next_width", "next"), Column("mmcs_next", "MMCS next", ".3f"),
         Column("distinct"), Column("matched"), Column("l0", "L0", ".2f"), Column("fvu", "FVU", ".3f"), Column("dead"))
TRUTH = (Column("truth_mmcs", "MMCS truth", ".3f"), Column("truth_recovered", "true found"))


def format_count(result: CountResult) -> str:
    """The table (one row per knob and width) and one line per knob with its estimate."""
    rows = [{"knob": k.knob, **vars(w)} for k in result.counts for w in k.widths]
    columns = TABLE + (TRUTH if result.truth is not None else ())
    lines = [f"feature count on {result.source}: {result.arch}; 'matched' = distinct features of a width found "
             f"above cosine {result.threshold:g} in the next width", "", format_rows(rows, columns), "",
             f"estimate: {result.estimator}"]
    lines += [estimate_line(k, result.truth) for k in result.counts]
    return "\n".join(lines)


def estimate_line(count: KnobCount, truth: int | None = None) -> str:
    """The estimate in words: N if the widest pair reached the plateau, else a lower bound."""
    fit, pair = count.estimate, count.widths[-2]
    where = f"the widest pair ({pair.width} in {pair.next_width}) matched {pair.matched}"
    if fit.saturated:
        text = (f"  {count.knob}: N ~ {fit.n:.0f}; saturated: {where} = {pair.matched / fit.n:.0%} of N "
                f"(a = {fit.a:.2g}, rms log error {fit.rms_log_error:.3f})")
    else:
        text = (f"  {count.knob}: at least {pair.matched} features; not saturated: {where}, under "
                f"{SATURATED:.0%} of the fit's N = {fit.n:.0f} (an extrapolation): add wider dictionaries")
    if truth is not None:
        text += f"; true N = {truth} (estimate / true = {(fit.n if fit.saturated else pair.matched) / truth:.2f})"
    return text


def matched_panel(ax, result: CountResult) -> None:
    """Matched features against width (log-log), the fitted curves, estimates and truth."""
    for i, count in enumerate(result.counts):
        colour, pairs = f"C{i}", count.widths[:-1]
        ws = np.geomspace(pairs[0].width / 2, pairs[-1].width * 4, 200)
        ax.plot([p.width for p in pairs], [p.matched for p in pairs], "o", color=colour, label=f"{count.knob} matched")
        ax.plot(ws, soft_min(ws, count.estimate.n, count.estimate.a), "--", color=colour, lw=1,
                label=f"{count.knob} fit: N ~ {count.estimate.n:.0f}" + ("" if count.estimate.saturated else " (extrapolated)"))
        if result.truth is not None:
            ax.plot([p.width for p in pairs], [p.truth_recovered for p in pairs], "x", color=colour,
                    label=f"{count.knob} true features recovered")
    ends = [result.counts[0].widths[0].width / 2, result.counts[0].widths[-2].width * 4]
    ax.plot(ends, ends, color="0.7", lw=0.8, label="matched = width")
    if result.truth is not None:
        ax.axhline(result.truth, color="k", lw=1, label=f"true N = {result.truth}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("dictionary width")
    ax.set_ylabel(f"distinct features found in the next width (cos > {result.threshold:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def recovery_panel(ax, result: CountResult, title: str = "") -> None:
    """MMCS against the knob, one line per width: against the truth on toy data, against the
    widest dictionary on a language model (the widest itself has no point there)."""
    toy = result.truth is not None
    for j, width in enumerate(w.width for w in result.counts[0].widths):
        points = [(k.value, k.widths[j].truth_mmcs if toy else k.widths[j].mmcs_widest) for k in result.counts]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=f"width {width} ({width / result.d_in:g}x)")
    ax.set_xlabel("k" if result.counts[0].knob.startswith("k") else "sparsity coefficient (L1)")
    ax.set_ylabel("MMCS against the true features" if toy else "MMCS against the widest dictionary")
    ax.set_title(title or result.source, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_count(result: CountResult, path: str | Path) -> Path:
    """count.png: the matched-count panel, and the recovery panel when there are several knobs."""
    from matplotlib.figure import Figure

    panels = 2 if len(result.counts) > 1 else 1
    fig = Figure(figsize=(6.5 * panels, 4.6), dpi=120)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    matched_panel(axes[0], result)
    axes[0].set_title(f"feature count: {result.source}", fontsize=9)
    if panels > 1:
        recovery_panel(axes[1], result)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_beside(lm: CountResult, toy: CountResult, path: str | Path) -> Path:
    """The LM's and the toy data's recovery panels side by side (seed 001's comparison)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.6), dpi=120)
    left, right = fig.subplots(1, 2)
    recovery_panel(left, lm, f"LM data: {lm.source}")
    recovery_panel(right, toy, f"toy data: {toy.source}")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: CountResult) -> str:
    """count.txt and count.png into the run folder; returns the text."""
    from saelab.atomic import write_text

    text = format_count(result)
    write_text(result.run_dir / "count.txt", text + "\n")
    plot_count(result, result.run_dir / "count.png")
    return text
