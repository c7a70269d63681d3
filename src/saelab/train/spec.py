"""TrainSpec: one SAE of a sweep — its shape and how it is trained — and the schedules it implies.

The same dataclass is the CLI's per-SAE options, the logged config and the `metadata.train`
saved beside each SAE. Schedules are pure functions of the step, so resuming needs no state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from saelab.errors import ConfigError
from saelab.sae.config import SAEConfig


@dataclass
class TrainSpec:
    arch: str = "relu"
    expansion: float | None = 8.0  # d_sae = expansion * d_in unless d_sae is given
    d_sae: int | None = None
    k: int | None = None  # topk / batchtopk
    coefficient: float = 0.0  # sparsity coefficient: L1 for relu, L0 for jumprelu
    decoder_norm: str = "weighted"
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100  # learning rate rises linearly over these
    decay_fraction: float = 0.2  # learning rate falls linearly to 0 over this last fraction of steps
    coefficient_warmup_steps: int = 0  # sparsity coefficient rises linearly from 0 over these
    init: str = "tied"  # "tied" or "data" (decoder rows are samples of the first batch)
    b_dec_init: str = "mean"  # "mean", "geometric_median" or "zeros"
    dead_tokens: int = 1_000_000  # a feature silent for this many tokens counts as dead
    resample_every: int = 0  # relu: Anthropic-style resampling of dead features every N steps (0: off)
    aux_k: int | None = None  # topk/batchtopk auxiliary loss over dead features (None: d_in // 2)
    aux_coefficient: float = 1 / 32
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    name: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("init", "b_dec_init"):
            allowed = {"init": ("tied", "data"), "b_dec_init": ("mean", "geometric_median", "zeros")}[field_name]
            if getattr(self, field_name) not in allowed:
                raise ConfigError(f"{field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        if self.lr <= 0 or self.coefficient < 0:
            raise ConfigError(f"lr must be > 0 and coefficient >= 0 (got lr={self.lr}, coefficient={self.coefficient})")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")

    def width(self, d_in: int) -> int:
        if self.d_sae is not None:
            return int(self.d_sae)
        if self.expansion is None:
            raise ConfigError("a TrainSpec needs d_sae or expansion")
        return int(round(self.expansion * d_in))

    def knob(self) -> str:
        """The swept setting in short: `k32` for topk / batchtopk, `c2` (the coefficient) otherwise."""
        return f"k{self.k}" if self.k is not None else f"c{self.coefficient:g}"

    def label(self, d_in: int) -> str:
        if self.name:
            return self.name
        return f"{self.arch}_{self.width(d_in)}_{self.knob()}"

    def sae_config(self, d_in: int, d_out: int | None = None, **where) -> SAEConfig:
        """The SAE this spec trains; `where` carries hook_name, hook_name_out, model_name."""
        return SAEConfig(
            d_in=d_in,
            d_sae=self.width(d_in),
            arch=self.arch,
            d_out=d_out,
            k=self.k,
            decoder_norm=self.decoder_norm,
            jumprelu_init_threshold=self.jumprelu_init_threshold,
            jumprelu_bandwidth=self.jumprelu_bandwidth,
            **where,
        )

    def lr_at(self, step: int, total_steps: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_steps = int(self.decay_fraction * total_steps)
        start = total_steps - decay_steps
        decay = 1.0 if step < start or decay_steps == 0 else max(0.0, (total_steps - step) / decay_steps)
        return self.lr * warm * decay

    def coefficient_at(self, step: int) -> float:
        if self.coefficient_warmup_steps <= 0:
            return self.coefficient
        return self.coefficient * min(1.0, (step + 1) / self.coefficient_warmup_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainSpec field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)
