"""Find the sparsity coefficient that trains an SAE to a target L0: bisection in log space.

L0 falls as the coefficient rises (roughly a power law, so the search works on log c). For
several targets at once, each round measures the midpoint of every open bracket in ONE call of
`measure` (the caller trains all of them in one GroupTrainer pass), and every measured point
narrows every target's bracket, not only the one that asked for it. A target is done when some
measured L0 lies within `tolerance` (relative) of it; after `rounds` rounds an open target
takes the log-log interpolation between its bracket's ends, the best guess the bracket gives.

Torch-free and training-free: `measure` is any function coefficients -> L0s, so the bracket
logic is tested with a fake monotone L0 and used with real training by `saelab frontier`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from saelab.errors import ConfigError

Measure = Callable[[list[float]], list[float]]  # coefficients -> the L0 each one trains to


def round_sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: tried coefficients stay readable in labels and folders."""
    return float(f"{x:.{digits - 1}e}")


@dataclass
class CoefficientSearch:
    """One target's search: its final bracket (L0(lo) > target >= L0(hi)), every point measured
    (coefficient, L0), and the chosen coefficient."""

    target_l0: float
    lo: float
    l0_lo: float
    hi: float
    l0_hi: float
    points: list[tuple[float, float]] = field(default_factory=list)
    coefficient: float | None = None
    converged: bool = False  # a measured L0 within tolerance (else `coefficient` is interpolated)

    def close_point(self, tolerance: float) -> tuple[float, float] | None:
        """The measured point nearest the target (in log L0), if it lies within tolerance."""
        near = [p for p in self.points if p[1] > 0 and abs(p[1] - self.target_l0) <= tolerance * self.target_l0]
        return min(near, key=lambda p: abs(math.log(p[1] / self.target_l0)), default=None)

    def midpoint(self) -> float:
        return round_sig(math.sqrt(self.lo * self.hi))

    def narrow(self, c: float, l0: float) -> None:
        """Take a measured point into the bracket if it lies inside it."""
        self.points.append((c, l0))
        if self.lo < c < self.hi:
            if l0 > self.target_l0:
                self.lo, self.l0_lo = c, l0
            else:
                self.hi, self.l0_hi = c, l0

    def interpolated(self) -> float:
        """log c linear in log L0 between the bracket's ends (the midpoint if an end has L0 0)."""
        if self.l0_hi <= 0 or self.l0_lo <= self.l0_hi:
            return self.midpoint()
        w = math.log(self.l0_lo / self.target_l0) / math.log(self.l0_lo / self.l0_hi)
        return round_sig(math.exp(math.log(self.lo) + w * (math.log(self.hi) - math.log(self.lo))))

    def to_dict(self) -> dict:
        return asdict(self)


def search_coefficients(measure: Measure, targets: Sequence[float], lo: float, hi: float, *,
                        tolerance: float = 0.1, rounds: int = 4) -> list[CoefficientSearch]:
    """One `CoefficientSearch` per target (see the module docstring). The bounds are measured
    first; a target outside [L0(hi), L0(lo)] is a ConfigError saying what the bounds reach."""
    if not 0 < lo < hi:
        raise ConfigError(f"the coefficient range must satisfy 0 < low < high, got {lo:g} {hi:g}")
    if tolerance <= 0 or rounds < 0:
        raise ConfigError(f"tolerance must be > 0 and rounds >= 0, got {tolerance:g} and {rounds}")
    l0_lo, l0_hi = measure([lo, hi])
    outside = [t for t in targets if not l0_hi <= t <= l0_lo]
    if outside:
        raise ConfigError(f"target L0 {', '.join(f'{t:g}' for t in outside)} cannot be reached by training: "
                          f"coefficients {lo:g}..{hi:g} train to L0 {l0_lo:.4g}..{l0_hi:.4g}; give targets in that "
                          "range or widen --coefficient-range")
    searches = [CoefficientSearch(t, lo, l0_lo, hi, l0_hi, [(lo, l0_lo), (hi, l0_hi)]) for t in targets]
    for _ in range(rounds):
        open_ = [s for s in searches if s.close_point(tolerance) is None and s.lo < s.midpoint() < s.hi]
        if not open_:
            break
        mids = sorted({s.midpoint() for s in open_})
        for c, l0 in zip(mids, measure(mids)):
            for s in searches:
                s.narrow(c, l0)
    for s in searches:
        close = s.close_point(tolerance)
        s.converged = close is not None
        s.coefficient = close[0] if close else s.interpolated()
    return searches
