"""The feature count's table, its estimate in words, and its figures (`saelab count`).

count.png: matched features against width per knob, with the estimate, and (toy) the true
number and the true features each width recovered. With several knobs a second panel is the
interim report's recovery plot: MMCS against the knob per width, against the true features on
toy data and against the widest dictionary on a language model (its stand-in for the truth;
toy panels show that too, dashed, so the two data kinds compare like for like). `plot_beside`
puts an LM's and a toy run's recovery panels side by side, as seed 001's notes compare them.
"""

from __future__ import annotations

from pathlib import Path

from saelab.atomic import write_text
from saelab.experiments.count import CountResult, KnobCount
from saelab.experiments.saturation import GAIN
from saelab.plots import save_figure
from saelab.tables import Column, format_rows

TABLE = (Column("knob"), Column("width"), Column("next_width", "next"), Column("mmcs_next", "MMCS next", ".3f"),
         Column("alive"), Column("distinct"), Column("matched"), Column("l0", "L0", ".2f"), Column("fvu", "FVU", ".3f"), Column("dead"))
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
    """The estimate in words: N where the count levelled off, else a lower bound."""
    est = count.estimate
    gains = ", ".join(f"{g:+.0%}" for g in est.gains)
    if est.saturated:
        text = (f"  {count.knob}: N ~ {est.n:.0f}: from width {est.at:.0f} a doubling stopped adding {GAIN:.0%} new "
                f"matched features (gains per doubling: {gains})")
    else:
        text = (f"  {count.knob}: at least {est.n:.0f} features; not levelled off: every doubling still added "
                f"{GAIN:.0%} or more ({gains}): add wider dictionaries")
    if truth is not None:
        text += f"; true N = {truth} (estimate / true = {est.n / truth:.2f})"
    return text


def matched_panel(ax, result: CountResult) -> None:
    """Matched features against width (log-log), each knob's estimate, and the truth."""
    import matplotlib.ticker as ticker

    for i, count in enumerate(result.counts):
        colour, pairs, est = f"C{i}", count.widths[:-1], count.estimate
        ax.plot([p.width for p in pairs], [p.matched for p in pairs], "o-", color=colour, label=f"{count.knob} matched")
        if est.saturated:
            ax.axhline(est.n, color=colour, ls="--", lw=1, label=f"{count.knob} estimate: N ~ {est.n:.0f}")
        if result.truth is not None:
            ax.plot([p.width for p in pairs], [p.truth_recovered for p in pairs], "x", color=colour,
                    label=f"{count.knob} true features recovered")
    ends = [result.counts[0].widths[0].width / 1.5, result.counts[0].widths[-2].width * 1.5]
    ax.plot(ends, ends, color="0.7", lw=0.8, label="matched = width")
    if result.truth is not None:
        ax.axhline(result.truth, color="k", lw=1, label=f"true N = {result.truth}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("dictionary width")
    ax.set_ylabel(f"distinct features found in the next width (cos > {result.threshold:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def recovery_panel(ax, result: CountResult, title: str = "") -> None:
    """MMCS against the knob, one colour per width: solid against the true features on toy
    data; dashed (toy) or solid (a model) against the widest dictionary, each of the width's
    features' best cosine there: the one measure both data kinds have (the widest has none)."""
    toy = result.truth is not None
    for j, width in enumerate(w.width for w in result.counts[0].widths):
        colour = f"C{j % 10}"
        widest = [(k.value, k.widths[j].mmcs_widest) for k in result.counts if k.widths[j].mmcs_widest is not None]
        if toy:
            ax.plot([k.value for k in result.counts], [k.widths[j].truth_mmcs for k in result.counts], "o-",
                    color=colour, label=f"width {width} ({width / result.d_in:g}x)")
        if widest:
            ax.plot(*zip(*widest), "s--" if toy else "o-", color=colour, lw=1 if toy else 1.5,
                    label=None if toy else f"width {width} ({width / result.d_in:g}x)")
    ax.set_xlabel("k" if result.counts[0].knob.startswith("k") else "sparsity coefficient (L1)")
    ax.set_ylabel("MMCS: true features (solid), widest dictionary (dashed)" if toy
                  else "MMCS against the widest dictionary")
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
    text = format_count(result)
    write_text(result.run_dir / "count.txt", text + "\n")
    plot_count(result, result.run_dir / "count.png")
    return text
