"""TrainSpec's GPU options, checked on CPU: bf16 autocast (fp32 master weights) and torch.compile
train to what fp32 eager training reaches; the CLI offers both."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.train.group import _to_device
from saelab.train.spec import TrainSpec
from saelab.train.trainer import SAETrainer


def _train(arch: str, steps: int = 120, **options) -> tuple[SAETrainer, dict]:
    """Train on sparse combinations of 128 random directions in 32 dimensions."""
    torch.manual_seed(0)
    knob = {"coefficient": 1.0} if arch in ("relu", "jumprelu", "gated") else {"k": 8}
    spec = TrainSpec(arch=arch, d_sae=128, lr=1e-3, **knob, **options)
    trainer = SAETrainer(spec, SAE.from_config(spec.sae_config(32)), steps, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(128, 32, generator=g)
    for i in range(steps):
        c = torch.rand(256, 128, generator=g) * (torch.rand(256, 128, generator=g) < 0.05)
        log = trainer.update(i, c @ basis, c @ basis, log=i == steps - 1)
    return trainer, log


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"])
def test_bf16_autocast_trains_like_fp32(arch):
    fp32, log32 = _train(arch)
    bf16, log16 = _train(arch, autocast="bf16")
    # the products ran in bf16 (the weights moved differently) ...
    assert not torch.equal(fp32.sae.W_dec, bf16.sae.W_dec)
    # ... yet the SAE is as good, and its weights and Adam moments stayed fp32
    assert log16["fvu"] == pytest.approx(log32["fvu"], rel=0.02)
    assert log16["l0"] == pytest.approx(log32["l0"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.sae.parameters())
    assert all(v.dtype == torch.float32 for state in bf16.opt.state.values()
               for k, v in state.items() if k != "step")


def test_autocast_products_are_bf16():
    """Inside the trainer's autocast the encoder GEMM gives bf16 pre-activations."""
    spec = TrainSpec(arch="relu", d_sae=64, coefficient=1.0, autocast="bf16")
    trainer = SAETrainer(spec, SAE.from_config(spec.sae_config(16)), 10, torch.Generator().manual_seed(0))
    seen = []
    pre_acts = trainer.sae.pre_acts
    trainer.sae.pre_acts = lambda x: seen.append(pre_acts(x).dtype) or pre_acts(x)
    trainer.update(0, torch.randn(32, 16), torch.randn(32, 16))
    assert seen == [torch.bfloat16]


def test_autocast_choice_is_checked():
    with pytest.raises(ConfigError, match="autocast"):
        TrainSpec(arch="relu", coefficient=1.0, autocast="fp8")


@pytest.mark.slow
def test_compile_trains_like_eager():
    """torch.compile (inductor on CPU: needs a C compiler) fuses the loss's elementwise passes;
    the weights it trains match eager's to float rounding."""
    eager, log_e = _train("relu", steps=12)
    try:
        compiled, log_c = _train("relu", steps=12, compile=True)
    except Exception as err:  # no compiler, or an inductor that cannot build here
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {err}"[:200])
    torch.testing.assert_close(compiled.sae.W_dec, eager.sae.W_dec, rtol=1e-4, atol=1e-5)
    assert log_c["mse"] == pytest.approx(log_e["mse"], rel=1e-4)


def test_to_device_keeps_cpu_batches_and_casts():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    out = _to_device(x, "cpu")
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, x.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_to_device_pinned_copy_to_gpu():
    x = torch.randn(64, 8)
    torch.testing.assert_close(_to_device(x, "cuda").cpu(), x)


def test_cli_offers_autocast_and_compile(capsys):
    import json

    from saelab.cli import main

    main(["train", "--arch", "relu", "--autocast", "bf16", "--compile", "--print-config"])
    specs = json.loads(capsys.readouterr().out)["specs"]
    assert specs and all(s["autocast"] == "bf16" and s["compile"] is True for s in specs)
