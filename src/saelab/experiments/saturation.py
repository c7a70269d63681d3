"""The feature-count estimator: where a matched-feature count m(w) levels off as the width w grows.

`saelab count` measures, for each width w of a sweep, how many distinct features of the
width-w dictionary the next wider one also learns. A dictionary narrower than the number of
features N the data holds learns real features with nearly every latent (on toy data 86-100% of
them match the ground truth), so m(w) ~ w; a wider one adds duplicates, splits and dead latents
but no new features, so m(w) ~ N. We fit the soft minimum

    m(w) = (w**-a + N**-a) ** (-1 / a)

with two parameters: the plateau N (the estimate) and the knee's sharpness a (a = 1: a soft,
harmonic knee; a -> inf: min(w, N)). Why this curve: on toy data the knee is sharp (at d=64,
N=256, relu: m = 55, 127, 235, 264 at w = 64 ... 512, i.e. a ~ 7), and the N(1 - exp(-c w / N))
saturation, whose knee shape is fixed, puts N at 377 there (+47%) where the soft minimum gives
264. The fit minimises squared log errors (counts span decades, so relative errors): a grid over
(log N, log a), then a pattern search from its best cell; deterministic, no optimiser library.

The fit is only as good as the widths: N is identified once the widest pair is past the knee.
`Saturation.saturated` says so when the widest pair's count reaches SATURATED of the fitted N;
otherwise the fitted N is an extrapolation and the count itself, m(w_last), is what the data
supports: the layer holds at least that many features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from saelab.errors import ConfigError

SATURATED = 0.8  # the widest pair's count over the fitted N at which the plateau counts as seen
_N_RANGE = (0.5, 256.0)  # N is searched from half the largest count to 256x the widest width
_A_RANGE = (0.25, 64.0)  # the knee's sharpness a


@dataclass(frozen=True)
class Saturation:
    """The fitted plateau `n` and sharpness `a`, the fit's RMS log error, and what the widest
    pair saw: its count `last` and whether it reached the plateau (`saturated`)."""

    n: float
    a: float
    rms_log_error: float
    last: float
    saturated: bool

    @property
    def lower_bound(self) -> float:
        """What the data shows without extrapolation: at least `last` features."""
        return self.last

    def to_dict(self) -> dict:
        return {**asdict(self), "lower_bound": self.lower_bound}


def soft_min(w, n, a):
    """The saturation curve (w**-a + n**-a) ** (-1 / a): ~w for w << n, -> n for w >> n."""
    w, n, a = np.asarray(w, float), np.asarray(n, float), np.asarray(a, float)
    return np.exp(-np.logaddexp(-a * np.log(w), -a * np.log(n)) / a)  # in logs: no overflow at large a


def fit_saturation(widths: Sequence[float], matched: Sequence[float]) -> Saturation:
    """Fit `soft_min` to the matched counts at `widths` (growing, at least two points);
    counts below 0.5 are taken as 0.5 (a log needs a positive count)."""
    w, m = np.asarray(widths, float), np.maximum(np.asarray(matched, float), 0.5)
    if w.ndim != 1 or w.shape != m.shape or len(w) < 2:
        raise ConfigError(f"the fit needs at least two (width, count) points; got {len(w)} widths, {len(m)} counts")
    if not np.all(np.diff(w) > 0):
        raise ConfigError(f"widths must grow; got {list(w)}")
    log_n = np.linspace(*np.log([_N_RANGE[0] * m.max(), _N_RANGE[1] * w.max()]), 801)
    log_a = np.linspace(*np.log(_A_RANGE), 161)
    err = _errors(w, m, log_n[:, None], log_a[None, :])
    i, j = np.unravel_index(np.argmin(err), err.shape)
    n, a = log_n[i], log_a[j]
    half = np.array([log_n[1] - log_n[0], log_a[1] - log_a[0]]) * 2
    for _ in range(200):  # pattern search: follow the best of a small grid; shrink it once the best is inside
        grid_n, grid_a = np.linspace(n - half[0], n + half[0], 9), np.linspace(a - half[1], a + half[1], 9)
        err = _errors(w, m, grid_n[:, None], grid_a[None, :])
        i, j = np.unravel_index(np.argmin(err), err.shape)
        n, a = grid_n[i], grid_a[j]
        if 0 < i < 8 and 0 < j < 8:
            half /= 4
        if half.max() < 1e-9:
            break
    n, a = float(np.exp(n)), float(np.exp(a))
    rms = float(np.sqrt(_errors(w, m, np.log(n), np.log(a)) / len(w)))
    return Saturation(n, a, rms, float(m[-1]), bool(m[-1] >= SATURATED * n))


def _errors(w, m, log_n, log_a):
    """Sum over points of the squared log error of soft_min(w; N = e**log_n, a = e**log_a)."""
    pred = soft_min(w, np.exp(np.asarray(log_n))[..., None], np.exp(np.asarray(log_a))[..., None])
    return ((np.log(pred) - np.log(m)) ** 2).sum(-1)
