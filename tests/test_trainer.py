"""SAETrainer on its own: one update is Adam on the SAE's loss with the spec's schedules; the
architecture's policies (unit-norm decoder, aux-k, resampling) are applied as documented."""

from __future__ import annotations

import copy

import pytest
import torch

from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.train import SAETrainer, TrainSpec


def trainer_for(spec: TrainSpec, d_in: int = 6, total: int = 10) -> SAETrainer:
    torch.manual_seed(0)
    sae = SAE(spec.sae_config(d_in))
    return SAETrainer(spec, sae, total, torch.Generator().manual_seed(0))


def test_two_updates_are_adam_steps_on_the_loss_with_the_schedules():
    spec = TrainSpec(arch="relu", d_sae=12, coefficient=0.2, lr=1e-2, warmup_steps=2, coefficient_warmup_steps=2,
                     beta1=0.8, beta2=0.95)
    trainer = trainer_for(spec)
    ref = copy.deepcopy(trainer.sae)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    torch.manual_seed(1)
    batches = [torch.randn(16, 6), torch.randn(16, 6)]
    for step, x in enumerate(batches):
        trainer.update(step, x, x)
        ref.zero_grad()
        ref.loss(x, x, coefficient=0.2 * (step + 1) / 2).loss.backward()  # coefficient warmed up over 2 steps
        lr = 1e-2 * (step + 1) / 2  # lr warmed up over 2 steps
        with torch.no_grad():
            for p, m_i, v_i in zip(params, m, v):
                m_i.mul_(0.8).add_(0.2 * p.grad)
                v_i.mul_(0.95).add_(0.05 * p.grad ** 2)
                m_hat, v_hat = m_i / (1 - 0.8 ** (step + 1)), v_i / (1 - 0.95 ** (step + 1))
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
    for (name, got), want in zip(trainer.sae.named_parameters(), params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_unit_norm_decoder_rows_stay_at_one(arch):
    trainer = trainer_for(TrainSpec(arch=arch, d_sae=12, coefficient=0.3, decoder_norm="unit", lr=5e-2, warmup_steps=1))
    assert trainer.unit_norm
    for step in range(5):
        x = torch.randn(32, 6)
        trainer.update(step, x, x)
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(12), atol=1e-6, rtol=0)


def test_weighted_decoder_rows_are_not_constrained():
    trainer = trainer_for(TrainSpec(arch="relu", d_sae=12, coefficient=0.3, lr=5e-2, warmup_steps=1))
    assert not trainer.unit_norm
    x = torch.randn(32, 6)
    trainer.update(0, x, x)
    assert (trainer.sae.W_dec.norm(dim=1) - 0.1).abs().max() > 1e-3


def test_aux_k_reaches_only_aux_k_architectures():
    """dead_tokens=0 makes every feature dead at once: topk trains them through aux-k, relu has no aux."""
    x = torch.randn(32, 6)
    topk = trainer_for(TrainSpec(arch="topk", k=2, d_sae=12, dead_tokens=0)).update(0, x, x)
    relu = trainer_for(TrainSpec(arch="relu", d_sae=12, coefficient=0.1, dead_tokens=0)).update(0, x, x)
    assert topk["aux"] > 0 and topk["dead"] == 12
    assert relu["aux"] == 0 and relu["dead"] == 12


def test_resampling_follows_its_documentation():
    """Only the batch row with a reconstruction error can be drawn; dead decoder rows become its
    direction at the mean live decoder norm, encoder columns at 0.2 x the mean live encoder norm,
    encoder biases 0, Adam moments 0; live features are untouched."""
    trainer = trainer_for(TrainSpec(arch="relu", d_sae=12, coefficient=0.1, resample_every=1, dead_tokens=100))
    sae = trainer.sae
    x0 = torch.randn(32, 6)
    trainer.update(0, x0, x0)  # Adam state exists
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()  # then sae(0) == 0: rows of zeros have no error
    x = torch.zeros(16, 6)
    x[5] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    trainer.since_fired[:] = 0
    trainer.since_fired[[2, 7, 9]] = 100
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 7, 9]] = True
    live_dec, live_enc = sae.W_dec[~dead].detach().clone(), sae.W_enc[:, ~dead].detach().clone()
    dec_norm, enc_norm = live_dec.norm(dim=1).mean(), live_enc.norm(dim=0).mean()
    assert trainer.resample(x, x) == 3
    direction = x[5] / x[5].norm()
    for j in (2, 7, 9):
        torch.testing.assert_close(sae.W_dec[j].detach(), direction * dec_norm)
        torch.testing.assert_close(sae.W_enc[:, j].detach(), direction * 0.2 * enc_norm)
    assert (sae.b_enc[dead] == 0).all() and (trainer.since_fired[dead] == 0).all()
    assert torch.equal(sae.W_dec[~dead], live_dec) and torch.equal(sae.W_enc[:, ~dead], live_enc)
    for param, index in ((sae.W_dec, dead), (sae.b_enc, dead)):
        state = trainer.opt.state[param]
        assert (state["exp_avg"][index] == 0).all() and (state["exp_avg_sq"][index] == 0).all()
        assert (state["exp_avg_sq"][~index] != 0).any()
    assert (trainer.opt.state[sae.W_enc]["exp_avg"][:, dead] == 0).all()


def test_resampling_is_refused_for_architectures_that_do_not_resample():
    with pytest.raises(ConfigError, match="resample_every applies to relu"):
        TrainSpec(arch="topk", k=2, resample_every=5)
    sae = SAE(6, 12, arch="topk", k=2)  # a spec that disagrees with the SAE it is given
    with pytest.raises(ConfigError, match="topk SAEs do not resample"):
        SAETrainer(TrainSpec(arch="relu", resample_every=5), sae, 10, torch.Generator())
