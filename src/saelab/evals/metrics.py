"""Reconstruction and sparsity metrics, feature densities and MMCS: each defined once, here.

The field has shipped wrong versions of these (variance about zero instead of the mean, MSE
scaled by batch size, scaled inputs compared with unscaled outputs), so every number saelab
reports comes from the definitions below and nowhere else. A "token" is one row after the
leading dimensions are flattened: `x` of shape `(..., d)` holds `N = x.numel() // d` tokens.

Streaming is the primary form: `ReconstructionStats` and `SparsityStats` keep sufficient
statistics in float64 (O(d + d_sae) memory, independent of the number of tokens) and merge
exactly (Chan et al.'s pairwise update for the mean and the sum of squared deviations), so
any split of the evaluation tokens into batches gives the one-shot answer. The one-shot
functions (`mse`, `fvu`, ...) are a single `update` of those accumulators, so the formula
lives in one place.

Pass `x` and `x_hat` in the same units: if inputs were scaled for training, either compare
the scaled input with the scaled output or unscale both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from saelab.errors import DataError

__all__ = [
    "ReconstructionStats", "SparsityStats", "MetricsAccumulator", "SAEMetrics", "OutlierReport",
    "mse", "total_variance", "fvu", "explained_variance", "cos", "l0", "l1",
    "feature_density", "density_histogram", "dead_count", "dense_count",
    "max_cosine", "mmcs",
]

DENSE_THRESHOLD = 0.1
HIST_BINS = 50
HIST_EPS = 1e-10


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """(..., k) -> (N, k); a 0-d tensor is not a batch of vectors."""
    if t.dim() == 0:
        raise DataError(f"{name} must have shape (..., dim); got a scalar")
    return t.detach().reshape(-1, t.shape[-1])


def _stat_device(t: torch.Tensor) -> torch.device:
    """Keep stats beside the data (no per-batch sync), except where float64 is missing."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


class ReconstructionStats:
    """Streaming sums for mse / fvu / explained variance / cos over (x, x_hat) batches.

    State (float64): `n` tokens, `mean` (d,) of x, `m2` = sum_t ||x_t - mean||^2,
    `sse` = sum_t ||x_t - x_hat_t||^2, `cos_sum` = sum_t cos(x_t, x_hat_t).
    `x` is the target x_hat approximates: the SAE input, or for a transcoder the MLP output.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2 = self.sse = self.cos_sum = None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> "ReconstructionStats":
        """Add a batch: x, x_hat (..., d), same shape. Returns self."""
        if x.shape != x_hat.shape:
            raise DataError(f"x and x_hat must have the same shape; got {tuple(x.shape)} "
                            f"and {tuple(x_hat.shape)}")
        dev = _stat_device(x)
        x64 = _rows(x, "x").to(dev, torch.float64)
        xh64 = _rows(x_hat, "x_hat").to(dev, torch.float64)
        if x64.shape[0] == 0:
            return self
        batch = ReconstructionStats()
        batch.n = x64.shape[0]
        batch.mean = x64.mean(0)
        batch.m2 = (x64 - batch.mean).square().sum()
        batch.sse = (x64 - xh64).square().sum()
        dot = (x64 * xh64).sum(-1)
        norms = x64.norm(dim=-1) * xh64.norm(dim=-1)
        # cos with a zero vector is undefined; count it as 0 rather than NaN.
        batch.cos_sum = torch.where(norms > 0, dot / norms.clamp_min(1e-300), 0.0).sum()
        return self.merge(batch)

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        """Fold another accumulator (e.g. another rank's) into this one. Returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.clone(), other.m2.clone()
            self.sse, self.cos_sum = other.sse.clone(), other.cos_sum.clone()
            return self
        if other.mean.shape != self.mean.shape:
            raise DataError(f"batch has d={other.mean.shape[0]}, earlier batches had "
                            f"d={self.mean.shape[0]}")
        dev = self.mean.device
        n = self.n + other.n
        delta = other.mean.to(dev) - self.mean
        self.m2 = self.m2 + other.m2.to(dev) + delta.square().sum() * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.sse = self.sse + other.sse.to(dev)
        self.cos_sum = self.cos_sum + other.cos_sum.to(dev)
        self.n = n
        return self

    def _need(self) -> None:
        if self.n == 0:
            raise DataError("no tokens were seen: call update() with a non-empty batch first")

    @property
    def mse(self) -> float:
        """(1/N) sum_t sum_i (x_ti - x_hat_ti)^2: summed over dims, averaged over tokens."""
        self._need()
        return self.sse.item() / self.n

    @property
    def total_variance(self) -> float:
        """(1/N) sum_t ||x_t - mean_t'(x_t')||^2: variance about the MEAN, summed over dims."""
        self._need()
        return self.m2.item() / self.n

    @property
    def fvu(self) -> float:
        """mse / total_variance (NaN when x is constant: the ratio is undefined)."""
        var = self.total_variance
        return self.mse / var if var > 0 else math.nan

    @property
    def explained_variance(self) -> float:
        """1 - fvu."""
        return 1.0 - self.fvu

    @property
    def cos(self) -> float:
        """(1/N) sum_t <x_t, x_hat_t> / (||x_t|| ||x_hat_t||), a zero vector counting as 0."""
        self._need()
        return self.cos_sum.item() / self.n


def _count_and_l1(f: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """f (N, d_sae) -> (#tokens with f > 0 per feature (d_sae,) int64, sum |f| float64).

    On CPU a column sum over a large bool matrix is ~3x slower than summing 256-row blocks
    into int16 (which cannot overflow at <= 256 rows); elsewhere one reduction is best.
    """
    rows = rows or (256 if f.device.type == "cpu" else max(f.shape[0], 1))
    acc_dtype = torch.int16 if rows <= 256 else torch.int64
    active = torch.zeros(f.shape[1], dtype=torch.int64, device=f.device)
    l1_sum = torch.zeros((), dtype=torch.float64, device=f.device)
    for i in range(0, f.shape[0], rows):
        block = f[i:i + rows]
        if not block.dtype.is_floating_point or block.element_size() < 4:
            block = block.float()  # bf16 / fp16 row sums lose too much precision
        active += (block > 0).sum(0, dtype=acc_dtype)
        l1_sum += torch.linalg.vector_norm(block, 1, dim=-1).to(torch.float64).sum()
    return active, l1_sum


class SparsityStats:
    """Streaming per-feature activation counts and L1 over f batches.

    State: `n` tokens, `active` (d_sae,) int64 = number of tokens with f > 0,
    `l1_sum` float64 = sum_t sum_j |f_tj|. A feature is active on a token when f > 0.
    """

    def __init__(self) -> None:
        self.n = 0
        self.active: torch.Tensor | None = None
        self.l1_sum: torch.Tensor | None = None

    def update(self, f: torch.Tensor) -> "SparsityStats":
        """Add a batch of feature activations f (..., d_sae). Returns self."""
        f = _rows(f, "f")
        if f.shape[0] == 0:
            return self
        batch = SparsityStats()
        batch.n = f.shape[0]
        batch.active, batch.l1_sum = _count_and_l1(f)
        return self.merge(batch)

    def merge(self, other: "SparsityStats") -> "SparsityStats":
        """Fold another accumulator into this one. Returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.active, self.l1_sum = other.n, other.active.clone(), other.l1_sum.clone()
            return self
        if other.active.shape != self.active.shape:
            raise DataError(f"batch has d_sae={other.active.shape[0]}, earlier batches had "
                            f"d_sae={self.active.shape[0]}")
        self.active = self.active + other.active.to(self.active.device)
        self.l1_sum = self.l1_sum + other.l1_sum.to(self.l1_sum.device)
        self.n += other.n
        return self

    def _need(self) -> None:
        if self.n == 0:
            raise DataError("no tokens were seen: call update() with a non-empty batch first")

    @property
    def density(self) -> torch.Tensor:
        """(d_sae,) float64 on CPU: fraction of tokens on which each feature is > 0."""
        self._need()
        return self.active.cpu().to(torch.float64) / self.n

    @property
    def l0(self) -> float:
        """(1/N) sum_t #{j : f_tj > 0} = sum of the densities."""
        self._need()
        return self.active.sum().item() / self.n

    @property
    def l1(self) -> float:
        """(1/N) sum_t sum_j |f_tj|."""
        self._need()
        return self.l1_sum.item() / self.n


def feature_density(f: torch.Tensor) -> torch.Tensor:
    """f (..., d_sae) -> (d_sae,) float64: fraction of tokens on which each feature is > 0."""
    return SparsityStats().update(f).density


def density_histogram(density: torch.Tensor, bins: int | Sequence[float] = HIST_BINS,
                      eps: float = HIST_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of log10(max(density, eps)): (counts (n_bins,) int64, edges (n_bins+1,)).

    Dead features (density 0) land at log10(eps), in the first bin. An int `bins` spans
    [log10(eps), 0] so histograms of different SAEs share edges; explicit edges may be given
    instead. Values outside the edges are clamped into the end bins: counts sum to d_sae.
    """
    if eps <= 0:
        raise DataError(f"eps must be > 0 (it is the floor for dead features); got {eps}")
    logd = density.detach().cpu().to(torch.float64).clamp_min(eps).log10()
    if isinstance(bins, int):
        if bins < 1:
            raise DataError(f"bins must be >= 1; got {bins}")
        edges = torch.linspace(math.log10(eps), 0.0, bins + 1, dtype=torch.float64)
    else:
        edges = torch.as_tensor(bins, dtype=torch.float64)
        if edges.dim() != 1 or edges.numel() < 2 or not bool((edges.diff() > 0).all()):
            raise DataError("bins must be an int or at least 2 strictly increasing edges")
    logd = logd.clamp(edges[0].item(), edges[-1].item())
    counts, _ = torch.histogram(logd, bins=edges)
    return counts.round().to(torch.int64), edges


def dead_count(density: torch.Tensor) -> int:
    """Number of features never active over the evaluation tokens (density == 0)."""
    return int((density == 0).sum().item())


def dense_count(density: torch.Tensor, threshold: float = DENSE_THRESHOLD) -> int:
    """Number of features active on more than `threshold` of tokens (density > threshold)."""
    return int((density > threshold).sum().item())


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of the squared error summed over dims (see ReconstructionStats.mse)."""
    return ReconstructionStats().update(x, x_hat).mse


def total_variance(x: torch.Tensor) -> float:
    """Mean over tokens of ||x_t - mean(x)||^2 (see ReconstructionStats.total_variance)."""
    return ReconstructionStats().update(x, x).total_variance


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: mse / total variance of x about its mean."""
    return ReconstructionStats().update(x, x_hat).fvu


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - fvu."""
    return ReconstructionStats().update(x, x_hat).explained_variance


def cos(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of the cosine between x_t and x_hat_t (0 where either is zero)."""
    return ReconstructionStats().update(x, x_hat).cos


def l0(f: torch.Tensor) -> float:
    """Mean number of features > 0 per token."""
    return SparsityStats().update(f).l0


def l1(f: torch.Tensor) -> float:
    """Mean over tokens of sum_j |f_tj|."""
    return SparsityStats().update(f).l1


@dataclass
class OutlierReport:
    """The rows an outlier rule (saelab.data.outliers) kept out of the metrics beside it, and
    the reconstruction over every row, them included. Keys of a metrics.json row:

        outliers            rows flagged (left out of mse, fvu, l0, density, ...)
        outlier_share       flagged / all rows evaluated
        outlier_multiple    the rule's multiple (null: no rule, nothing flagged)
        outlier_positions   [[context position, count], ...] most frequent first (top 10)
        outlier_tokens      [[token, count], ...] the tokens at those rows, most frequent first
        mse_all, fvu_all    mse and fvu over all rows, outliers included
    """

    multiple: float | None
    n_outliers: int
    share: float
    mse_all: float
    fvu_all: float
    positions: list[list[int]] = field(default_factory=list)
    tokens: list[list] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"outliers": self.n_outliers, "outlier_share": self.share, "outlier_multiple": self.multiple,
                "outlier_positions": self.positions, "outlier_tokens": self.tokens,
                "mse_all": self.mse_all, "fvu_all": self.fvu_all}

    @classmethod
    def from_dict(cls, d: dict) -> "OutlierReport | None":
        """The report in a flat row, or None if the row has none."""
        if "outliers" not in d:
            return None
        return cls(d["outlier_multiple"], d["outliers"], d["outlier_share"], d["mse_all"], d["fvu_all"],
                   d.get("outlier_positions", []), d.get("outlier_tokens", []))


@dataclass
class SAEMetrics:
    """Everything `MetricsAccumulator` reports; `to_dict()` gives these keys of a metrics.json
    row (the row itself is `saelab.evals.entry.MetricsEntry`).

    Sparsity fields are None when no feature activations were given. `density` (d_sae,)
    is kept as a tensor and left out of `to_dict()` unless asked for. `outliers` is set when an
    outlier rule chose the rows (saelab.evals.reconstruction): its keys join the row.
    """

    n_tokens: int
    mse: float
    fvu: float
    explained_variance: float
    cos: float
    l0: float | None = None
    l1: float | None = None
    d_sae: int | None = None
    dead: int | None = None
    dense: int | None = None
    dense_threshold: float = DENSE_THRESHOLD
    density_hist_counts: list[int] | None = None
    density_hist_edges: list[float] | None = None
    density: torch.Tensor | None = None
    outliers: OutlierReport | None = None

    def to_dict(self, include_density: bool = False) -> dict:
        """Plain JSON-able dict (NaN stays float NaN: a broken SAE should look broken)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("density", "outliers")}
        if self.outliers is not None:
            out.update(self.outliers.to_dict())
        if include_density and self.density is not None:
            out["density"] = self.density.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SAEMetrics":
        """The metrics from a dict holding (at least) `to_dict()`'s keys; other keys are ignored."""
        names = {f.name for f in fields(cls)} - {"density", "outliers"}
        m = cls(**{k: d[k] for k in names if k in d}, outliers=OutlierReport.from_dict(d))
        if d.get("density") is not None:
            m.density = torch.tensor(d["density"], dtype=torch.float64)
        return m


class MetricsAccumulator:
    """Streams (x, x_hat, f) batches; `result()` gives every metric above in O(d + d_sae) memory.

    Usage: `acc = MetricsAccumulator(); for b in batches: acc.update(x, sae(x), sae.encode(x))`
    then `acc.result().to_dict()`. `f` may be omitted (e.g. for a non-SAE baseline), but then
    for every batch. For a transcoder, `x` is the target (MLP output), not the SAE input.
    """

    def __init__(self, dense_threshold: float = DENSE_THRESHOLD,
                 hist_bins: int | Sequence[float] = HIST_BINS, hist_eps: float = HIST_EPS):
        self.recon = ReconstructionStats()
        self.sparsity = SparsityStats()
        self.dense_threshold, self.hist_bins, self.hist_eps = dense_threshold, hist_bins, hist_eps

    def update(self, x: torch.Tensor, x_hat: torch.Tensor,
               f: torch.Tensor | None = None) -> "MetricsAccumulator":
        """Add one batch: x, x_hat (..., d); f (..., d_sae) with the same leading dims."""
        if f is not None and f.shape[:-1] != x.shape[:-1]:
            raise DataError(f"f's leading dims {tuple(f.shape[:-1])} must match x's "
                            f"{tuple(x.shape[:-1])}")
        if (f is None) != (self.sparsity.n == 0) and self.recon.n > 0:
            raise DataError("give feature activations f for every batch or for none")
        self.recon.update(x, x_hat)
        if f is not None:
            self.sparsity.update(f)
        return self

    def merge(self, other: "MetricsAccumulator") -> "MetricsAccumulator":
        """Fold in another accumulator (another rank, another shard). Returns self."""
        self.recon.merge(other.recon)
        self.sparsity.merge(other.sparsity)
        return self

    def result(self) -> SAEMetrics:
        """Finalise: the metrics over all tokens seen so far (the accumulator stays usable)."""
        r = self.recon
        m = SAEMetrics(n_tokens=r.n, mse=r.mse, fvu=r.fvu, explained_variance=r.explained_variance,
                       cos=r.cos, dense_threshold=self.dense_threshold)
        if self.sparsity.n:
            s, density = self.sparsity, self.sparsity.density
            counts, edges = density_histogram(density, self.hist_bins, self.hist_eps)
            m.l0, m.l1, m.d_sae, m.density = s.l0, s.l1, density.numel(), density
            m.dead, m.dense = dead_count(density), dense_count(density, self.dense_threshold)
            m.density_hist_counts, m.density_hist_edges = counts.tolist(), edges.tolist()
        return m


def _unit_rows(m: torch.Tensor, name: str) -> torch.Tensor:
    if m.dim() != 2 or m.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty (n, d) matrix; got shape {tuple(m.shape)}")
    m = m.detach().to(torch.promote_types(m.dtype, torch.float32))
    norms = m.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, m / norms.clamp_min(1e-30), 0.0)  # zero rows stay zero


@torch.no_grad()
def max_cosine(learned: torch.Tensor, reference: torch.Tensor,
               chunk: int = 4096) -> torch.Tensor:
    """For each reference row, the max signed cosine with any learned row: (n_ref,).

    learned (n_learned, d), reference (n_ref, d), e.g. decoder rows W_dec vs ground-truth
    features, or two dictionaries. Signed, not absolute: features fire positively, so a
    flipped direction is not a recovery. A zero row has cosine 0 with everything. Reference
    rows are processed `chunk` at a time so memory is O(chunk * n_learned).
    """
    lu, ru = _unit_rows(learned, "learned"), _unit_rows(reference, "reference")
    if lu.shape[1] != ru.shape[1]:
        raise DataError(f"learned has d={lu.shape[1]} but reference has d={ru.shape[1]}")
    dtype = torch.promote_types(lu.dtype, ru.dtype)
    lu, ru = lu.to(dtype), ru.to(device=lu.device, dtype=dtype)
    out = [(ru[i:i + chunk] @ lu.T).amax(dim=1) for i in range(0, ru.shape[0], chunk)]
    return torch.cat(out).clamp(-1.0, 1.0)


def mmcs(learned: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean max cosine similarity: mean over reference rows of max_cosine(learned, reference)."""
    return max_cosine(learned, reference).mean().item()


@torch.no_grad()
def distinct_rows(directions: torch.Tensor, threshold: float, chunk: int = 2048) -> torch.Tensor:
    """(n,) bool: rows with no earlier row above cosine `threshold` (signed, as max_cosine).

    A dictionary wider than the features its data holds learns some twice; counting its
    features without these duplicates is what lets a feature count level off. Zero rows are
    distinct (cosine 0 with everything). Rows are compared `chunk` at a time."""
    u = _unit_rows(directions, "directions")
    n = u.shape[0]
    later = torch.arange(n, device=u.device)
    duplicate = torch.zeros(n, dtype=torch.bool, device=u.device)
    for i in range(0, n, chunk):
        block = u[i:i + chunk] @ u.T  # (c, n): rows i.. against every row
        after = later[None, :] > later[i:i + chunk, None]
        duplicate |= ((block > threshold) & after).any(0)
    return ~duplicate
