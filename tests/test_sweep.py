"""saelab.train.sweep: the grid's order, its step-based defaults, and which fields apply where."""

import pytest

from saelab.errors import ConfigError
from saelab.train.spec import TrainSpec
from saelab.train.sweep import SweepGrid, applies, check_applies, sweep_specs


def test_grid_order_knobs_and_widths():
    grid = SweepGrid(arch=["jumprelu", "topk"], expansion=[2], d_sae=[40], coefficient=[0.1, 0.2], k=[3])
    specs = sweep_specs(grid, steps=100)
    assert [s.label(16) for s in specs] == ["jumprelu_32_c0.1", "jumprelu_32_c0.2", "topk_32_k3",
                                            "jumprelu_40_c0.1", "jumprelu_40_c0.2", "topk_40_k3"]
    assert specs[3].expansion is None and specs[3].d_sae == 40


def test_step_defaults_and_fields_that_override_them():
    relu, topk = sweep_specs(SweepGrid(arch=["relu", "topk"], coefficient=[1.0], k=[8]), steps=200)
    assert (relu.lr, relu.warmup_steps, relu.coefficient_warmup_steps, relu.dead_tokens) == \
        (1e-3, 10, 20, TrainSpec().dead_tokens)
    assert (topk.lr, topk.warmup_steps, topk.coefficient_warmup_steps, topk.dead_tokens) == (1e-3, 10, 0, 200_000)
    relu, topk = sweep_specs(SweepGrid(arch=["relu", "topk"], coefficient=[1.0], k=[8]), steps=200,
                             warmup_steps=0, dead_tokens=5, aux_k=16, coefficient_warmup_steps=1)
    assert (relu.warmup_steps, relu.dead_tokens, relu.aux_k, relu.coefficient_warmup_steps) == (0, 5, None, 1)
    assert (topk.warmup_steps, topk.dead_tokens, topk.aux_k, topk.coefficient_warmup_steps) == (0, 5, 16, 0)


def test_what_does_not_apply_is_an_error():
    assert applies("aux_k", "batchtopk") and not applies("aux_k", "jumprelu") and applies("lr", "relu")
    with pytest.raises(ConfigError, match="aux_k applies only to architectures topk, batchtopk, matryoshka_batchtopk; this sweep's are relu"):
        sweep_specs(SweepGrid(arch=["relu"]), steps=10, aux_k=4)
    with pytest.raises(ConfigError, match="k applies only to"):
        check_applies(["k"], ["relu", "jumprelu"])
    with pytest.raises(ConfigError, match="unknown architecture 'gated2'; valid: relu, topk"):
        sweep_specs(SweepGrid(arch=["gated2"]), steps=10)
    with pytest.raises(ConfigError, match="topk is swept over k, and the grid gives no values"):
        sweep_specs(SweepGrid(arch=["topk"], k=[]), steps=10)
    with pytest.raises(ConfigError, match="at least one width"):
        sweep_specs(SweepGrid(expansion=[]), steps=10)
    with pytest.raises(ConfigError, match="grid's axes"):
        sweep_specs(SweepGrid(), steps=10, k=4)
