"""Where two L0 curves cross: is pruning or training the better way to an L0, and up to where?

Each curve is a few measured (L0, value) points. Both are read as piecewise linear in log L0
(L0 axes are log scaled everywhere in saelab) over the L0 range both cover; the difference
trained - pruned is taken at every L0 either curve was measured at inside that range, and a
sign change between two such L0s is a crossing, placed by linear interpolation of the
difference in log L0. `frontier` reports one `Crossing` per metric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# (metrics.json key, whether higher is better)
METRICS = (("loss_recovered", True), ("mse", False), ("ce_delta", False))
Curve = list[tuple[float, float]]  # (L0, value)


@dataclass
class Crossing:
    metric: str
    l0: list[float]  # where the curves cross (empty: one family is better over the whole overlap)
    overlap: tuple[float, float] | None  # the L0 range both curves cover
    better_below: str | None  # the better family below the first crossing (or everywhere)
    summary: str  # one sentence

    def to_dict(self) -> dict:
        return asdict(self)


def _interp(curve: Curve, x: float) -> float:
    """The curve at x, linear in log L0 between its points (x inside its L0 range)."""
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * math.log(x / x0) / math.log(x1 / x0)
    return pts[0][1]  # a curve of one point


def crossings(pruned: Curve, trained: Curve) -> tuple[list[float], tuple[float, float] | None, list[float]]:
    """(crossing L0s, the overlap, trained - pruned at each grid L0 of the overlap)."""
    pruned = [(x, y) for x, y in pruned if x > 0 and math.isfinite(y)]
    trained = [(x, y) for x, y in trained if x > 0 and math.isfinite(y)]
    if not pruned or not trained:
        return [], None, []
    low = max(min(x for x, _ in pruned), min(x for x, _ in trained))
    high = min(max(x for x, _ in pruned), max(x for x, _ in trained))
    if low > high:
        return [], None, []
    grid = sorted({x for x, _ in pruned + trained if low <= x <= high} | {low, high})
    diff = [_interp(trained, x) - _interp(pruned, x) for x in grid]
    found = []
    for (x0, d0), (x1, d1) in zip(zip(grid, diff), zip(grid[1:], diff[1:])):
        if d0 == 0 and (not found or found[-1] != x0):
            found.append(x0)
        elif d0 * d1 < 0:
            found.append(math.exp(math.log(x0) + d0 / (d0 - d1) * math.log(x1 / x0)))
    if diff[-1] == 0 and len(grid) > 1 and (not found or found[-1] != grid[-1]):
        found.append(grid[-1])
    return found, (low, high), diff


def curve_crossing(pruned: Curve, trained: Curve, metric: str, higher_is_better: bool) -> Crossing:
    """The `Crossing` of the two families' curves for one metric, with its sentence."""
    found, overlap, diff = crossings(pruned, trained)
    if overlap is None:
        span = lambda c: f"{min(x for x, _ in c):.3g}..{max(x for x, _ in c):.3g}" if c else "none"
        return Crossing(metric, [], None, None, f"the families' L0 ranges do not overlap (pruned {span(pruned)}, "
                                                f"trained {span(trained)}), so they cannot be compared at one L0")
    first = next((d for d in diff if d != 0), 0.0)
    better = None if first == 0 else "trained" if (first > 0) == higher_is_better else "pruned"
    other = {"trained": "pruned", "pruned": "trained"}.get(better)
    where = f"L0 {overlap[0]:.3g}..{overlap[1]:.3g}"
    if better is None:
        return Crossing(metric, found, overlap, None, f"the two families are equal over {where}")
    if not found:
        return Crossing(metric, [], overlap, better,
                        f"no crossing: {better} SAEs are better over the whole shared range {where}")
    if len(found) == 1:
        return Crossing(metric, found, overlap, better, f"the curves cross at L0 {found[0]:.3g} (within {where}): "
                                                        f"{better} SAEs are better below it, {other} SAEs above")
    at = ", ".join(f"{x:.3g}" for x in found)
    return Crossing(metric, found, overlap, better, f"the curves cross at L0 {at} (within {where}): {better} SAEs are "
                                                    "better at the lowest L0, and the lead changes at each crossing")
