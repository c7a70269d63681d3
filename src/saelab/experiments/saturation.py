"""The feature-count estimator: the width at which doubling a dictionary stops finding new features.

`saelab count` measures m(w): how many distinct features of the width-w dictionary the next
wider one also learns. Below the number of features N the data holds, a dictionary spends its
latents on real features and the next width finds them again, so m(w) grows with w: on toy data
by 67-182% per doubling. Past N a wider dictionary adds few features the next width agrees on
(composites of correlated features, near-copies under the threshold): m(w) creeps, by 6-29% per
doubling in the same runs. So the estimate is

    N = m(w*), w* the first width whose next doubling adds less than GAIN (40%) new matched features.

GAIN sits above the largest creep seen (29%) with room, and below the smallest rise (67%). On a
language model the count decelerates rather than stops (the default LM's residual stream: +80%,
then +47%), and a doubling that still adds 40% is read as still rising: a lower bound.

Over the nine toy runs measured (d 16-64, N 24-256, relu and topk, three seeds at one size) it
came within 0.91-1.04 of the true N (tests/test_count.py keeps their counts).

Why not fit a saturation curve and read off its plateau: the creep past N makes any plateau
overshoot. Measured on the same runs, a fitted soft minimum (w^-a + N^-a)^(-1/a) overshot by
3-40%, a fixed-shape N(1 - exp(-w/N)) by ~45% (d=64, N=256), and a narrow dictionary's blended
features (its count below w) bend a fit further. The rule's resolution is the width grid: N is
read at a width of the sweep, so a knee between two widths is read at the wider one (with a
little creep) or, if the step to it grew less than GAIN, at the narrower one: up to ~30% short
with doublings (N = 160 between 128 and 256 reads 128). Gains are per doubling whatever the
steps, so a finer grid (--widths 1 1.5 2 3 4 6 8) reads closer (that N at 192: 1.03).

If every doubling still adds GAIN or more, the layer holds at least m at the widest pair: a
lower bound, not an estimate (add wider dictionaries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from saelab.errors import ConfigError

GAIN = 0.4  # new matched features per doubling below which the count has stopped growing


@dataclass(frozen=True)
class Saturation:
    """The estimate: `n` = m(w*) at the width `at` = w*; or, when every doubling still grows
    (`saturated` False), `n` is the widest pair's count, a lower bound. `gains`: the new matched
    features per doubling, between each width and the next."""

    n: float
    at: float | None
    saturated: bool
    gains: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def doubling_gains(widths: Sequence[float], matched: Sequence[float]) -> list[float]:
    """Per consecutive pair of widths, the relative growth of the count per doubling of width:
    (m_next / m) ** (1 / log2(w_next / w)) - 1 (a count of 0 grows infinitely)."""
    out = []
    for (w, m), (w2, m2) in zip(zip(widths, matched), zip(widths[1:], matched[1:])):
        out.append(math.inf if m <= 0 else (m2 / m) ** (1 / math.log2(w2 / w)) - 1)
    return out


def estimate_count(widths: Sequence[float], matched: Sequence[float], gain: float = GAIN) -> Saturation:
    """The estimate above from the matched counts at growing `widths` (two points at least)."""
    widths, matched = [float(w) for w in widths], [float(m) for m in matched]
    if len(widths) != len(matched) or len(widths) < 2:
        raise ConfigError(f"the estimate needs at least two (width, count) points; got {len(widths)} widths, "
                          f"{len(matched)} counts")
    if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0:
        raise ConfigError(f"widths must grow; got {widths}")
    gains = doubling_gains(widths, matched)
    for i, g in enumerate(gains):
        if g < gain:
            return Saturation(matched[i], widths[i], True, gains)
    return Saturation(matched[-1], None, False, gains)
