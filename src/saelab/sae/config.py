"""SAEConfig: what defines an SAE's structure (the architecture, widths, hooks, provenance).

Saved in cfg.json under `metadata.saelab`; how the SAE is trained lives in `saelab.train.spec`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saelab.errors import ConfigError
from saelab.sae.activations import ACTIVATIONS

DECODER_NORMS = ("weighted", "unit")


@dataclass
class SAEConfig:
    """What defines an SAE's structure; saved in cfg.json (training settings live in TrainSpec)."""

    d_in: int
    d_sae: int
    arch: str = "relu"
    d_out: int | None = None  # None: an autoencoder (d_out = d_in)
    k: int | None = None  # active features per token, topk / batchtopk
    decoder_norm: str = "weighted"  # relu: L1 weighted by decoder norms, or unit-norm decoder rows
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    apply_b_dec_to_input: bool | None = None  # None: True for autoencoders, False for transcoders
    hook_name: str | None = None
    hook_name_out: str | None = None  # transcoders: the activation they predict
    model_name: str | None = None
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)  # free-form provenance (training spec, dataset, ...)

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.is_transcoder
        self.validate()

    @property
    def is_transcoder(self) -> bool:
        return self.d_out != self.d_in or self.hook_name_out is not None

    def validate(self) -> None:
        if self.arch not in ACTIVATIONS:
            raise ConfigError(f"unknown architecture {self.arch!r}; valid: {', '.join(ACTIVATIONS)}")
        for name in ("d_in", "d_sae", "d_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if ACTIVATIONS[self.arch].uses_k:
            if not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise ConfigError(f"arch {self.arch!r} needs k with 1 <= k <= d_sae={self.d_sae}, got k={self.k!r}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ConfigError(f"decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ConfigError(f"dtype must be float32, float16, bfloat16 or float64, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("d_in", "d_sae") if n not in data]
        if missing:
            raise ConfigError(f"SAE config is missing required field(s) {missing}; it has {sorted(data)}")
        return cls(**{k: v for k, v in data.items() if k in known})
