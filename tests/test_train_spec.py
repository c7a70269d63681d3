"""TrainSpec: the schedules (hand-computed tables), its fields as CLI options, labels, dicts."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from saelab.errors import ConfigError
from saelab.sae import ArchOptions
from saelab.train import TrainSpec

# (warmup_steps, decay_fraction, total_steps, step) -> lr for lr=1: warm = min(1, (step + 1) / max(1, warmup));
# decay over the last int(decay_fraction * total) steps: (total - step) / decay_steps once step >= total - decay_steps
LR_TABLE = [
    (10, 0.2, 100, 0, 0.1),
    (10, 0.2, 100, 4, 0.5),
    (10, 0.2, 100, 8, 0.9),
    (10, 0.2, 100, 9, 1.0),  # last warmup step
    (10, 0.2, 100, 10, 1.0),
    (10, 0.2, 100, 79, 1.0),  # last step before the decay
    (10, 0.2, 100, 80, 1.0),  # decay starts at (100 - 80) / 20
    (10, 0.2, 100, 81, 0.95),
    (10, 0.2, 100, 90, 0.5),
    (10, 0.2, 100, 99, 0.05),  # last step
    (0, 0.2, 100, 0, 1.0),  # no warmup
    (1, 0.2, 100, 0, 1.0),
    (10, 0.0, 100, 99, 1.0),  # no decay
    (10, 1.0, 100, 0, 0.1),  # decay over the whole run, under the warmup
    (10, 1.0, 100, 50, 0.5),
    (10, 1.0, 100, 99, 0.01),
    (0, 1.0, 100, 25, 0.75),
    (0, 0.25, 10, 7, 1.0),  # int(2.5) = 2 decay steps: 8 and 9
    (0, 0.25, 10, 8, 1.0),
    (0, 0.25, 10, 9, 0.5),
    (200, 0.2, 100, 99, 0.5 * 0.05),  # warmup longer than the run
]


@pytest.mark.parametrize("warmup, decay_fraction, total, step, expected", LR_TABLE)
def test_lr_at(warmup, decay_fraction, total, step, expected):
    spec = TrainSpec(lr=1.0, warmup_steps=warmup, decay_fraction=decay_fraction)
    assert spec.lr_at(step, total) == pytest.approx(expected, abs=1e-12)
    assert TrainSpec(lr=3e-4, warmup_steps=warmup, decay_fraction=decay_fraction).lr_at(step, total) == pytest.approx(3e-4 * expected)


@pytest.mark.parametrize("warmup, step, expected", [
    (4, 0, 0.5), (4, 1, 1.0), (4, 2, 1.5), (4, 3, 2.0), (4, 10, 2.0), (0, 0, 2.0), (1, 0, 2.0), (3, 1, 4 / 3),
])
def test_coefficient_at(warmup, step, expected):
    spec = TrainSpec(coefficient=2.0, coefficient_warmup_steps=warmup)
    assert spec.coefficient_at(step) == pytest.approx(expected, abs=1e-12)


SIMPLE = {str, int, float, bool, list[int]}


def test_every_field_is_a_cli_option_with_help():
    """Flat fields of simple types (or Optional of them), each with a one-line help."""
    hints = typing.get_type_hints(TrainSpec)
    for f in dataclasses.fields(TrainSpec):
        help_text = f.metadata.get("help")
        assert help_text and "\n" not in help_text, f.name
        kinds = set(typing.get_args(hints[f.name])) - {type(None)} if typing.get_origin(hints[f.name]) in (
            typing.Union, __import__("types").UnionType) else {hints[f.name]}
        assert len(kinds) == 1 and kinds <= SIMPLE, (f.name, hints[f.name])
    names = {f.name for f in dataclasses.fields(TrainSpec)}
    assert {f.name for f in dataclasses.fields(ArchOptions)} <= names


def test_labels_and_knobs_are_unchanged():
    assert TrainSpec(arch="relu", coefficient=2.0).label(128) == "relu_1024_c2"
    assert TrainSpec(arch="topk", k=32).label(128) == "topk_1024_k32"
    assert TrainSpec(arch="batchtopk", k=8, d_sae=64).label(16) == "batchtopk_64_k8"
    assert TrainSpec(arch="relu", coefficient=0.15, expansion=2.0).knob() == "c0.15"
    assert TrainSpec(name="mine").label(16) == "mine"


def test_dict_round_trip_and_unknown_fields():
    spec = TrainSpec(arch="matryoshka_batchtopk", k=4, matryoshka_prefixes=[16, 64], d_sae=128, lr=1e-3)
    assert TrainSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown TrainSpec field"):
        TrainSpec.from_dict({"arch": "relu", "l1": 0.3})
