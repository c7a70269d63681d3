"""SAEConfig: what defines an SAE's structure (the architecture, widths, hooks, provenance).

`ArchOptions` holds the architecture and its settings once; `SAEConfig` (saved in cfg.json under
`metadata.saelab`) and `TrainSpec` (`saelab.train.spec`) both extend it, so adding a setting to an
architecture is one field here plus its use in the architecture's class. Which settings apply to
which architecture is the architecture class's business (`saelab.sae.architectures`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field

from saelab.errors import ConfigError
from saelab.sae.activations import DECODER_NORMS
from saelab.sae.architectures import architecture, check_reads

DTYPES = ("float32", "float16", "bfloat16", "float64")
PROVENANCE = "provenance"  # metadata key of the training text and row rules (saelab.data.provenance)


def field_help(text: str, choices: tuple | None = None) -> dict:
    """A field's CLI help (and valid values, where they are a fixed list): `saelab train`'s
    options are generated from these fields."""
    return {"help": text, **({"choices": choices} if choices else {})}


@dataclass(kw_only=True)
class ArchOptions:
    """The architecture and its settings; each one applies to the architectures that read it and
    must keep its default elsewhere (a clear ConfigError otherwise)."""

    arch: str = field(default="relu", metadata=field_help(
        "SAE architecture: relu, topk, batchtopk, jumprelu, gated or matryoshka_batchtopk"))
    k: int | None = field(default=None, metadata=field_help(
        "active features per token (topk, batchtopk, matryoshka_batchtopk)"))
    decoder_norm: str = field(default="weighted", metadata=field_help(
        "relu, gated: 'weighted' (penalty weighted by decoder-row norms) or 'unit' (unit-norm decoder rows)",
        DECODER_NORMS))
    jumprelu_init_threshold: float = field(default=1e-3, metadata=field_help("jumprelu: initial threshold of every feature"))
    jumprelu_bandwidth: float = field(default=1e-3, metadata=field_help(
        "jumprelu: width of the rectangle kernel of the threshold's straight-through gradient"))
    matryoshka_prefixes: list[int] | None = field(default=None, metadata=field_help(
        "matryoshka_batchtopk: nested dictionary sizes whose reconstructions are trained, strictly "
        "increasing, up to d_sae (default: d_sae/16, d_sae/8, ..., d_sae)"))

    def arch_options(self) -> dict:
        """The ArchOptions fields and their values (to build an SAEConfig from a TrainSpec)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ArchOptions)}

    def check_arch_options(self, d_sae: int | None) -> None:
        """The architecture exists, every setting it does not read keeps its default, and the
        ones it reads are valid (d_sae None: not known yet, as in a TrainSpec with `expansion`)."""
        for f in dataclasses.fields(ArchOptions):
            if f.name != "arch" and getattr(self, f.name) != f.default:
                check_reads(self.arch, f.name)
        architecture(self.arch).check_options(self, d_sae)


@dataclass
class SAEConfig(ArchOptions):
    """What defines an SAE's structure; saved in cfg.json (training settings live in TrainSpec)."""

    d_in: int
    d_sae: int
    _: KW_ONLY
    d_out: int | None = None  # None: an autoencoder (d_out = d_in)
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
        for name in ("d_in", "d_sae", "d_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.check_arch_options(self.d_sae)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        """The config saelab saved (metadata.saelab of cfg.json). Unknown keys are an error, as in
        TrainSpec.from_dict; SAELens's own keys are read by saelab.sae.format instead."""
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("d_in", "d_sae") if n not in data]
        if missing:
            raise ConfigError(f"SAE config is missing required field(s) {missing}; it has {sorted(data)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SAE config field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)
