"""Feature recovery over training: each SAE of a group measured against reference directions
(the toy data's true features, or a reference SAE's decoder) every few steps.

Seed 001: "If you initialize the autoencoders with a sample of datapoints ... the initial phases
of feature recovery is much faster ... but converges to full recovery at about the same time."
Seeing that needs the recovery metric during training, not only at the end: `RecoveryCurve`
rides on GroupTrainer's `on_start` (the SAEs as initialised: step 0) and `on_step` (every
`every` steps and the last), so a run without it pays nothing. Points are written to
recovery_curve.json as they come; a resumed run keeps those up to its checkpoint and measures the
rest again (the same SAEs, so the same numbers). Under torch.distributed each rank measures its
own SAEs and rank 0 writes them all.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Callable

from saelab.atomic import write_json
from saelab.errors import ConfigError
from saelab.plots import save_figure
from saelab.sae import SAE
from saelab.tables import Column, format_rows
from saelab.train import GroupTrainer

CURVE_FILE = "recovery_curve.json"
Measure = Callable[[SAE], object]  # an SAE -> something with to_dict() (e.g. toy's Recovery)


class RecoveryCurve:
    """Measures `trainer`'s SAEs with `measure` at the start and every `every` steps; attach it
    with `curve.attach()` before `trainer.fit`. `points`: [{"step", "saes": {label: dict}}]."""

    def __init__(self, trainer: GroupTrainer, measure: Measure, every: int, path: str | Path,
                 reference: str = "ground truth"):
        if every < 1:
            raise ConfigError(f"the curve's step interval must be >= 1, got {every}")
        self.trainer, self.measure, self.every, self.path = trainer, measure, every, Path(path)
        self.reference = reference
        self.points: list[dict] = []

    def attach(self) -> "RecoveryCurve":
        self.trainer.on_start, self.trainer.on_step = self.start, self.after_step
        return self

    def start(self, step: int) -> None:
        """Keep the points of an interrupted run up to `step`; measure the SAEs as they start."""
        if step > 0 and self.path.exists():
            self.points = [p for p in json.loads(self.path.read_text())["points"] if p["step"] <= step]
        if step == 0:
            self.record(0)

    def after_step(self, step: int, entries=None) -> None:
        if step % self.every == 0 or step == self.trainer.config.total_steps:
            self.record(step)

    def record(self, step: int) -> None:
        """Measure every SAE of the group now (a collective under torch.distributed)."""
        self.trainer.stop_if_nonfinite()  # never a curve point of a diverged SAE
        mine = [self.measure(sae).to_dict() for sae in self.trainer.saes]
        values = self.trainer.shard.gather(mine)
        self.points.append({"step": step, "saes": dict(zip(self.trainer.labels, values))})
        if self.trainer.shard.writes:
            write_json(self.path, self.to_dict())

    def to_dict(self) -> dict:
        return {"every": self.every, "reference": self.reference, "labels": self.trainer.labels,
                "inits": {label: spec.init for label, spec in zip(self.trainer.labels, self.trainer.specs)},
                "points": self.points}

    def series(self, key: str = "mmcs") -> dict[str, list[tuple[int, float]]]:
        return curve_series(self.to_dict(), key)


def curve_series(curve: dict, key: str = "mmcs") -> dict[str, list[tuple[int, float]]]:
    """{label: [(step, value), ...]} from a recovery_curve.json's content."""
    return {label: [(p["step"], p["saes"][label][key]) for p in curve["points"]] for label in curve["labels"]}


def format_curve_summary(curve: dict, columns: int = 5, reach: float = 0.9) -> str:
    """One row per SAE: its init, MMCS at `columns` recorded steps spread over the run (the first
    is the initial SAE, the last the final one), and the first step it reached MMCS `reach`."""
    steps = [p["step"] for p in curve["points"]]
    picked = sorted({round(i * (len(steps) - 1) / max(columns - 1, 1)) for i in range(columns)})
    rows = []
    for label, points in curve_series(curve).items():
        first = next((s for s, v in points if v >= reach), None)
        rows.append({"sae": label, "init": curve["inits"][label], f"reached {reach:g}": first,
                     **{f"step {steps[i]}": points[i][1] for i in picked}})
    cols = ["sae", "init", *(Column(f"step {steps[i]}", fmt=".3f") for i in picked), f"reached {reach:g}"]
    return f"MMCS against the {curve['reference']} during training\n\n" + format_rows(rows, cols)


def plot_recovery_curves(curve: dict, path: str | Path, title: str = "") -> Path:
    """MMCS against the reference over training steps, one line per SAE: a colour per SAE of
    the sweep, solid for tied init, dashed for data-sample init."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for label, points in curve_series(curve).items():
        init = curve["inits"][label]
        base = label.removesuffix(f"_{init}")
        colour = colours.setdefault(base, f"C{len(colours) % 10}")
        ax.plot([s for s, _ in points], [v for _, v in points], color=colour,
                linestyle="--" if init == "data" else "-", label=f"{base} ({init} init)")
    ax.set_xlabel("training step")
    ax.set_ylabel("\n".join(textwrap.wrap(f"MMCS against the {curve['reference']}", 36)))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("\n".join(textwrap.wrap(title or "feature recovery during training: data-sample vs tied init", 72)),
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
