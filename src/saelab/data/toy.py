"""Synthetic activations with known ground-truth features, after Sharkey et al.'s interim report.

Why: on real activations nobody knows the true features, so whether an SAE *recovers* features
can only be measured here (MMCS against `features`). The generative model:

- `features` (n_features, d): random unit-norm directions, n_features > d (superposition).
- Feature i fires with probability p_i, decaying along the index (exponential: p_i ∝ decay**i;
  power: p_i ∝ (i+1)**-decay), scaled so that sum_i p_i = mean_active (capped at 1 each).
- Correlated firing (optional) through a Gaussian copula: z = A g + sqrt(1 - rho) e with
  g ~ N(0, I_r), e ~ N(0, I_n) and rows of A random with norm sqrt(rho), so each z_i ~ N(0, 1)
  and corr(z_i, z_j) = a_i . a_j. Feature i is on when z_i < Phi^-1(p_i): its marginal firing
  probability stays exactly p_i while features that share factors fire together (or avoid
  each other, for opposite signs). Uncorrelated is the same with rho = 0.
- Magnitudes uniform in [0, 1); x = acts @ features (+ optional Gaussian noise).

Batch i depends only on (seed, i) (its own generator, seeded by numpy's SeedSequence from
both), so training resumed at step i sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from saelab.errors import ConfigError

__all__ = ["ToyDataConfig", "ToyDataSource", "firing_probabilities"]

_FEATURE_STREAM, _BATCH_STREAM = 0, 1


@dataclass
class ToyDataConfig:
    """Options of the toy generator (also its logged / saved config)."""

    d: int = 256                 # dimension of x
    n_features: int = 512        # ground-truth features (> d for superposition)
    mean_active: float = 5.0     # expected number of features on per sample
    decay: float = 0.99          # exponential: base per index; power: exponent
    decay_kind: str = "exponential"  # "exponential" | "power"
    correlated: bool = True      # Gaussian-copula correlated firing
    correlation: float = 0.5     # rho: share of each latent's variance from the shared factors
    n_factors: int = 16          # rank r of the correlation structure
    noise_std: float = 0.0       # std of isotropic Gaussian noise added to x
    batch_size: int = 4096
    seed: int = 0

    def validate(self) -> "ToyDataConfig":
        """Raise ConfigError naming the bad field and what is valid."""
        if self.d < 1 or self.n_features < 1 or self.batch_size < 1 or self.n_factors < 1:
            raise ConfigError("d, n_features, batch_size and n_factors must be >= 1; got "
                              f"{self.d}, {self.n_features}, {self.batch_size}, {self.n_factors}")
        if not 0 < self.mean_active <= self.n_features:
            raise ConfigError(f"mean_active must be in (0, n_features={self.n_features}]; "
                              f"got {self.mean_active}")
        if self.decay_kind not in ("exponential", "power"):
            raise ConfigError(f"decay_kind must be 'exponential' or 'power'; got {self.decay_kind!r}")
        if self.decay_kind == "exponential" and not 0 < self.decay <= 1:
            raise ConfigError(f"exponential decay must be in (0, 1] (p_i ∝ decay**i); got {self.decay}")
        if self.decay_kind == "power" and self.decay < 0:
            raise ConfigError(f"power decay must be >= 0 (p_i ∝ (i+1)**-decay); got {self.decay}")
        if not 0 <= self.correlation < 1:
            raise ConfigError(f"correlation must be in [0, 1); got {self.correlation}")
        if self.noise_std < 0 or self.seed < 0:
            raise ConfigError(f"noise_std and seed must be >= 0; got {self.noise_std}, {self.seed}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def firing_probabilities(cfg: ToyDataConfig) -> torch.Tensor:
    """(n_features,) float64: p_i ∝ decay profile, each <= 1, summing to cfg.mean_active.

    Where scaling would push the most frequent features past 1, they are capped at 1 and the
    rest rescaled (water-filling), so the expected number active is still exactly mean_active.
    """
    i = torch.arange(cfg.n_features, dtype=torch.float64)
    if cfg.decay_kind == "exponential":
        w = torch.exp(i * np.log(cfg.decay))  # decay**i without overflow worries
    else:
        w = (i + 1).pow(-cfg.decay)
    capped = torch.zeros(cfg.n_features, dtype=torch.bool)
    while not bool(capped.all()):  # the capped set only grows: <= n_features rounds
        scale = (cfg.mean_active - capped.sum()) / w[~capped].sum()
        p = torch.where(capped, 1.0, w * scale)
        if not bool((p > 1).any()):
            return p.clamp(max=1.0)
        capped |= p >= 1
    return torch.ones(cfg.n_features, dtype=torch.float64)


def _generator(seed: int, *key: int) -> torch.Generator:
    """A torch generator for the stream `key` of `seed`; distinct keys never share a seed."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ToyDataSource:
    """Toy activation stream. Shapes: features (n_features, d); batches (batch_size, d).

    `features`, `probabilities` and `loadings` are fixed by cfg.seed; `batch(i)` by (seed, i).
    """

    def __init__(self, cfg: ToyDataConfig | None = None, **overrides):
        cfg = cfg or ToyDataConfig()
        self.cfg = ToyDataConfig(**{**asdict(cfg), **overrides}).validate()
        g = _generator(self.cfg.seed, _FEATURE_STREAM)
        n, d, r = self.cfg.n_features, self.cfg.d, self.cfg.n_factors
        feats = torch.randn(n, d, generator=g)
        self.features = feats / feats.norm(dim=1, keepdim=True)
        self.probabilities = firing_probabilities(self.cfg).float()
        self.thresholds = torch.special.ndtri(self.probabilities.double()).float()  # (n,)
        rho = self.cfg.correlation if self.cfg.correlated else 0.0
        a = torch.randn(n, r, generator=g)
        self.loadings = a / a.norm(dim=1, keepdim=True) * rho ** 0.5  # (n, r); corr = A A^T
        self._own_scale = (1.0 - rho) ** 0.5

    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def latent_correlation(self) -> torch.Tensor:
        """(n, n) correlation of the copula's Gaussian latents z (identity if uncorrelated): the
        ground truth of which features tend to fire together, for analysing a trained SAE (e.g.
        whether it merges or splits correlated features). Sampling does not use it."""
        c = self.loadings @ self.loadings.T
        return c.fill_diagonal_(1.0)

    def sample(self, n: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n samples: (x (n, d) float32, true_acts (n, n_features) float32, >= 0)."""
        if n < 0:
            raise ConfigError(f"n must be >= 0; got {n}")
        nf = self.cfg.n_features
        z = torch.randn(n, nf, generator=generator)
        if self.cfg.correlated and self.cfg.correlation > 0:
            factors = torch.randn(n, self.cfg.n_factors, generator=generator)
            z = torch.addmm(z, factors, self.loadings.T, beta=self._own_scale)
        mags = torch.rand(n, nf, generator=generator)
        acts = torch.where(z < self.thresholds, mags, 0.0)
        x = acts @ self.features
        if self.cfg.noise_std > 0:
            x += self.cfg.noise_std * torch.randn(n, self.cfg.d, generator=generator)
        return x, acts

    def batch_and_acts(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i with its true activations; depends only on (cfg.seed, i)."""
        if i < 0:
            raise ConfigError(f"batch index must be >= 0; got {i}")
        return self.sample(self.cfg.batch_size, _generator(self.cfg.seed, _BATCH_STREAM, i))

    def batch(self, i: int) -> torch.Tensor:
        """Batch i: (batch_size, d), deterministic in (cfg.seed, i)."""
        return self.batch_and_acts(i)[0]

    def iter_from(self, step: int = 0, n_steps: int | None = None) -> Iterator[torch.Tensor]:
        """Batches step, step+1, ... (n_steps of them, or forever): resume = iter_from(step)."""
        i = step
        while n_steps is None or i < step + n_steps:
            yield self.batch(i)
            i += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_from(0)
