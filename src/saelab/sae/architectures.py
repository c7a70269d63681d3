"""The architecture registry: name -> class, and the words errors use to say what applies where.

Adding an architecture is one class (see `saelab.sae.activations` for the interface) and one
entry here; nothing else in saelab branches on architecture names.
"""

from __future__ import annotations

from typing import Callable

from saelab.errors import ConfigError
from saelab.sae.activations import Activation, BatchTopK, JumpReLU, ReLU, TopK
from saelab.sae.gated import Gated
from saelab.sae.matryoshka import MatryoshkaBatchTopK

ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (ReLU, TopK, BatchTopK, JumpReLU, Gated, MatryoshkaBatchTopK)
}


def architecture(name: str) -> type[Activation]:
    """The class of architecture `name`; a ConfigError listing the valid names otherwise."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown architecture {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# training settings only some architectures read, and the class property that says which
_TRAINING_SETTINGS: dict[str, Callable[[type[Activation]], bool]] = {
    "coefficient": lambda c: c.knob == "coefficient",
    "coefficient_warmup_steps": lambda c: c.knob == "coefficient",
    "resample_every": lambda c: c.resamples,
    "aux_k": lambda c: c.uses_aux_k,
    "aux_coefficient": lambda c: c.uses_aux_k,
}


def reads(cls: type[Activation], setting: str) -> bool:
    """Whether architecture `cls` reads `setting` (a field of ArchOptions or TrainSpec): its own
    `settings`, the training settings above by its properties, and every other field (lr,
    init, ...) always. The one rule for errors, sweeps and the CLI."""
    if setting in _TRAINING_SETTINGS:
        return _TRAINING_SETTINGS[setting](cls)
    if any(setting in other.settings for other in ACTIVATIONS.values()):
        return setting in cls.settings
    return True


def check_reads(arch: str, setting: str) -> None:
    """A ConfigError naming where `setting` applies, unless architecture `arch` reads it."""
    if not reads(architecture(arch), setting):
        raise not_applicable(setting, arch, lambda c: reads(c, setting))


def names_where(test: Callable[[type[Activation]], bool]) -> str:
    """The architectures for which `test` holds, as a comma-separated list."""
    return ", ".join(name for name, cls in ACTIVATIONS.items() if test(cls))


def takes(cls: type[Activation]) -> str:
    """What an architecture's settings are, in words: 'k', 'a sparsity coefficient, decoder_norm'."""
    knob = "k" if cls.knob == "k" else "a sparsity coefficient"
    return ", ".join([knob, *(s for s in cls.settings if s != "k")])


def not_applicable(setting: str, arch: str, test: Callable[[type[Activation]], bool]) -> ConfigError:
    """The error for a setting given to an architecture it does not apply to."""
    return ConfigError(f"{setting} applies to {names_where(test)}; {arch} takes {takes(architecture(arch))}")


def saelens_architecture(saelens_name: str) -> type[Activation]:
    """The class a SAELens folder of architecture `saelens_name` loads as (SAEs and transcoders)."""
    for cls in ACTIVATIONS.values():
        if cls.saelens_native and saelens_name in (cls.saelens_name, cls.saelens_transcoder_name):
            return cls
    training = [cls for cls in ACTIVATIONS.values() if cls.saelens_training_name == saelens_name]
    if training:
        raise ConfigError(
            f"this is a SAELens {saelens_name} training checkpoint; load the folder SAELens writes with "
            "save_inference_model (a jumprelu), or train the SAE with saelab"
        )
    readable = sorted({n for c in ACTIVATIONS.values() if c.saelens_native
                       for n in (c.saelens_name, c.saelens_transcoder_name) if n})
    raise ConfigError(f"SAELens architecture {saelens_name!r} is not supported; saelab loads {readable}")
