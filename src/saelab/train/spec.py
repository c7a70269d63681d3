"""TrainSpec: one SAE of a sweep — its architecture, width and how it is trained — and the
schedules it implies.

A flat dataclass: the SAE's architecture settings come from `ArchOptions` (shared with SAEConfig,
so an architecture's new setting is one edit), the training settings are its own fields, and every
field carries `metadata["help"]`, so the CLI can offer each one as an option. It is also the
logged config and the `metadata.train` saved beside each SAE. Schedules are pure functions of the
step, so resuming needs no state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saelab.errors import ConfigError
from saelab.sae.architectures import check_reads
from saelab.sae.config import ArchOptions, SAEConfig, field_help

INITS = ("tied", "data")
B_DEC_INITS = ("mean", "geometric_median", "zeros")
AUX_COEFFICIENT = 1 / 32
AUTOCASTS = ("bf16",)



@dataclass
class TrainSpec(ArchOptions):
    """One SAE of a sweep: the ArchOptions fields (arch, k, decoder_norm, ...) and training."""

    expansion: float | None = field(default=8.0, metadata=field_help("d_sae = expansion * d_in, unless d_sae is given"))
    d_sae: int | None = field(default=None, metadata=field_help("dictionary width (features); overrides expansion"))
    coefficient: float = field(default=0.0, metadata=field_help(
        "sparsity coefficient: weighted L1 for relu and gated, L0 for jumprelu (not for k architectures)"))
    lr: float = field(default=4e-4, metadata=field_help("peak Adam learning rate"))
    beta1: float = field(default=0.9, metadata=field_help("Adam beta1"))
    beta2: float = field(default=0.999, metadata=field_help("Adam beta2"))
    warmup_steps: int = field(default=100, metadata=field_help("the learning rate rises linearly over these first steps"))
    decay_fraction: float = field(default=0.2, metadata=field_help(
        "the learning rate falls linearly to 0 over this last fraction of the steps"))
    coefficient_warmup_steps: int = field(default=0, metadata=field_help(
        "the sparsity coefficient rises linearly from 0 over these first steps"))
    init: str = field(default="tied", metadata=field_help(
        "decoder init: 'tied' (random rows, W_enc = W_dec^T) or 'data' (rows are samples of the first batch)", INITS))
    b_dec_init: str = field(default="mean", metadata=field_help(
        "b_dec init from the first batch: 'mean', 'geometric_median' or 'zeros' (transcoders: always 0)",
        B_DEC_INITS))
    dead_tokens: int = field(default=1_000_000, metadata=field_help("a feature silent for this many tokens counts as dead"))
    resample_every: int = field(default=0, metadata=field_help(
        "relu: Anthropic-style resampling of dead features every N steps (0: off)"))
    aux_k: int | None = field(default=None, metadata=field_help(
        "topk, batchtopk, matryoshka: dead features per token in the aux-k loss (default d_in // 2)"))
    aux_coefficient: float = field(default=AUX_COEFFICIENT, metadata=field_help(
        "topk, batchtopk, matryoshka: weight of the aux-k loss over dead features"))
    autocast: str | None = field(default=None, metadata=field_help(
        "compute the SAE's forward and backward in this dtype under torch.autocast; weights, gradients and Adam "
        "stay fp32 (for GPUs: bf16 products run at several times fp32's rate)", AUTOCASTS))
    compile: bool = field(default=False, metadata=field_help(
        "torch.compile the training loss (fuses its elementwise passes; worth it on a GPU, slow to start)"))
    name: str | None = field(default=None, metadata=field_help("label of the SAE's folder (default: <arch>_<width>_<knob>)"))

    def __post_init__(self) -> None:
        for field_name, allowed in (("init", INITS), ("b_dec_init", B_DEC_INITS), ("autocast", (None, *AUTOCASTS))):
            if getattr(self, field_name) not in allowed:
                raise ConfigError(f"{field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        if self.lr <= 0 or self.coefficient < 0:
            raise ConfigError(f"lr must be > 0 and coefficient >= 0 (got lr={self.lr}, coefficient={self.coefficient})")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        self.check_arch_options(self.d_sae)
        self._check_training_settings()

    def _check_training_settings(self) -> None:
        """Training settings that only some architectures use keep their defaults elsewhere."""
        for f in dataclasses.fields(TrainSpec):
            if getattr(self, f.name) != f.default:
                check_reads(self.arch, f.name)

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
        return SAEConfig(d_in, self.width(d_in), d_out=d_out, **self.arch_options(), **where)

    def lr_at(self, step: int, total_steps: int) -> float:
        """lr * linear warmup over `warmup_steps` * linear decay to 0 over the last `decay_fraction`."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_steps = int(self.decay_fraction * total_steps)
        start = total_steps - decay_steps
        decay = 1.0 if step < start or decay_steps == 0 else max(0.0, (total_steps - step) / decay_steps)
        return self.lr * warm * decay

    def coefficient_at(self, step: int) -> float:
        """The coefficient, warmed up linearly over `coefficient_warmup_steps`."""
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
