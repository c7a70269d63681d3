"""A sweep's grid: every architecture at every width, at each of its knob values, as TrainSpecs.

An architecture's knob is `k` when its class says `knob = "k"` (topk, batchtopk, ...) and the
sparsity `coefficient` otherwise (relu's L1, jumprelu's L0, ...); which other settings it takes
is `saelab.sae.architectures.reads`. The registry is asked, never a list of names, so a new
architecture joins sweeps by being registered.

The grid also fills a few training settings from the number of steps (`sweep_defaults`): they
are what `saelab train` and `saelab quickstart` have always used, and any field given
explicitly wins over them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from saelab.errors import ConfigError
from saelab.sae.architectures import ACTIVATIONS, architecture, reads
from saelab.train.spec import TrainSpec

# what sweep_defaults sets, as --help shows it
SWEEP_DEFAULTS_HELP = {
    "lr": "1e-3",
    "warmup_steps": "steps // 20",
    "coefficient_warmup_steps": "steps // 10",
    "dead_tokens": "200000 for k architectures",
}


@dataclass
class SweepGrid:
    """The axes: architectures x widths (expansions of d_in, then absolute d_sae values) x each
    architecture's knob values (`coefficient` or `k`)."""

    arch: list[str] = field(default_factory=lambda: ["relu", "topk"])
    expansion: list[float] = field(default_factory=lambda: [8])
    d_sae: list[int] = field(default_factory=list)
    coefficient: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    k: list[int] = field(default_factory=lambda: [16, 32])


def uses_k(arch: str) -> bool:
    """Whether `arch` is swept over k (else over the sparsity coefficient); unknown names are
    an error listing the registered ones."""
    return architecture(arch).knob == "k"


def applies(name: str, arch: str) -> bool:
    """Whether TrainSpec field `name` means something for `arch` (its class says:
    `saelab.sae.architectures.reads`)."""
    return reads(architecture(arch), name)


def check_applies(names: Iterable[str], archs: Iterable[str]) -> None:
    """A ConfigError for the first field in `names` that applies to none of `archs`."""
    archs = list(dict.fromkeys(archs))
    for name in names:
        if not any(applies(name, arch) for arch in archs):
            valid = [a for a in ACTIVATIONS if applies(name, a)]
            raise ConfigError(f"{name} applies only to architectures {', '.join(valid)}; this sweep's "
                              f"are {', '.join(archs)}")


def sweep_defaults(arch: str, steps: int) -> dict:
    """The settings the grid gives every spec of `arch` for a run of `steps` steps."""
    out = {"lr": 1e-3, "warmup_steps": steps // 20}
    if uses_k(arch):
        out["dead_tokens"] = 200_000
    else:
        out["coefficient_warmup_steps"] = steps // 10
    return out


def sweep_specs(grid: SweepGrid, steps: int, defaults: dict | None = None, **fields) -> list[TrainSpec]:
    """One TrainSpec per width x architecture x knob value, in that nesting order. `fields`
    (any TrainSpec fields but the axes) are set on every spec they apply to, over a caller's
    `defaults` (set where they apply, never an error), over `sweep_defaults`."""
    axes = {"arch", "expansion", "d_sae", "coefficient", "k"} & set(fields)
    if axes:
        raise ConfigError(f"{sorted(axes)} are the grid's axes; set them on the SweepGrid")
    check_applies(fields, grid.arch)
    widths = [{"expansion": e} for e in grid.expansion] + [{"expansion": None, "d_sae": n} for n in grid.d_sae]
    if not widths:
        raise ConfigError("a sweep needs at least one width (expansion or d_sae)")
    specs = []
    for width in widths:
        for arch in grid.arch:
            knobs = [{"k": k} for k in grid.k] if uses_k(arch) else [{"coefficient": c} for c in grid.coefficient]
            if not knobs:
                raise ConfigError(f"{arch} is swept over {'k' if uses_k(arch) else 'coefficient'}, "
                                  "and the grid gives no values")
            given = {**(defaults or {}), **fields}
            settings = {**sweep_defaults(arch, steps), **{n: v for n, v in given.items() if applies(n, arch)}}
            specs += [TrainSpec(arch=arch, **width, **knob, **settings) for knob in knobs]
    return specs



def per_init(specs: list[TrainSpec], inits: list[str], d_in: int) -> list[TrainSpec]:
    """Seed 001's data-sample init beside tied init: with several decoder inits, every spec
    once per init, labelled `<label>_<init>` (init-major order); with one, every spec takes it
    (labels unchanged) unless it is the default ("tied"): then each spec keeps its own."""
    inits = list(dict.fromkeys(inits))
    if inits == ["tied"]:
        return list(specs)
    if len(inits) == 1:
        return [dataclasses.replace(spec, init=inits[0]) for spec in specs]
    return [dataclasses.replace(spec, init=init, name=f"{spec.label(d_in)}_{init}") for init in inits for spec in specs]
