"""Toy data: the ground truth, the firing statistics and the resumable batch stream."""

import numpy as np
import pytest
import torch

from saelab.data.toy import ToyDataConfig, ToyDataSource, firing_probabilities
from saelab.errors import ConfigError

SMALL = dict(d=16, n_features=48, batch_size=64, n_factors=4)


def test_features_are_unit_norm_and_overcomplete():
    src = ToyDataSource(ToyDataConfig(**SMALL))
    assert src.features.shape == (48, 16)
    assert torch.allclose(src.features.norm(dim=1), torch.ones(48), atol=1e-6)
    assert np.linalg.matrix_rank(src.features.numpy()) == 16


@pytest.mark.parametrize("kind,decay", [("exponential", 0.9), ("power", 1.2)])
def test_firing_probabilities_follow_the_decay(kind, decay):
    cfg = ToyDataConfig(n_features=30, mean_active=3.0, decay=decay, decay_kind=kind)
    p = firing_probabilities(cfg).numpy()
    i = np.arange(30)
    w = decay ** i if kind == "exponential" else (i + 1.0) ** -decay
    assert p.sum() == pytest.approx(3.0)
    assert np.allclose(p, 3.0 * w / w.sum())


def test_firing_probabilities_cap_at_one_and_keep_the_mean():
    cfg = ToyDataConfig(n_features=10, mean_active=6.0, decay=0.5)
    p = firing_probabilities(cfg).numpy()
    assert p.max() == 1.0 and p.sum() == pytest.approx(6.0)
    free = p < 1
    assert np.allclose(p[free][1:] / p[free][:-1], 0.5)  # uncapped ones keep the profile
    assert firing_probabilities(ToyDataConfig(n_features=5, mean_active=5.0)).tolist() == [1.0] * 5


@pytest.mark.parametrize("correlated", [False, True])
def test_empirical_firing_matches_target(correlated):
    src = ToyDataSource(ToyDataConfig(**SMALL, mean_active=5.0, decay=0.95,
                                      correlated=correlated, correlation=0.7))
    x, acts = src.sample(20000, torch.Generator().manual_seed(0))
    on = (acts > 0).float()
    assert on.sum(1).mean().item() == pytest.approx(5.0, abs=0.15)
    freq, p = on.mean(0), src.probabilities
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt() + 1e-3)
    assert freq[:8].mean() > 2 * freq[-8:].mean()  # decays along the index
    assert torch.all((acts >= 0) & (acts < 1))
    assert torch.allclose(x, acts @ src.features, atol=1e-5)


def test_correlation_option_correlates_firing():
    cfg = ToyDataConfig(d=8, n_features=24, mean_active=8.0, decay=0.97, n_factors=2,
                        correlation=0.8)
    g = torch.Generator().manual_seed(1)
    corr_of = {}
    for correlated in (False, True):
        src = ToyDataSource(cfg, correlated=correlated)
        on = (src.sample(20000, g)[1] > 0).double().numpy()
        c = np.corrcoef(on.T)
        off = ~np.eye(24, dtype=bool)
        corr_of[correlated] = (c[off], src.latent_correlation().numpy()[off])
    c_off, latent_off = corr_of[False]
    assert np.abs(c_off).max() < 0.05 and np.all(latent_off == 0)
    c_on, latent_on = corr_of[True]
    assert np.abs(c_on).max() > 0.3
    assert np.corrcoef(c_on, latent_on)[0, 1] > 0.9  # co-firing follows the latent structure


def test_noise_is_added_with_the_requested_scale():
    src = ToyDataSource(ToyDataConfig(**SMALL, noise_std=0.3))
    x, acts = src.sample(4000, torch.Generator().manual_seed(2))
    assert (x - acts @ src.features).std().item() == pytest.approx(0.3, rel=0.03)


def test_batches_depend_only_on_seed_and_index():
    src = ToyDataSource(ToyDataConfig(**SMALL, seed=7))
    again = ToyDataSource(ToyDataConfig(**SMALL, seed=7))
    other = ToyDataSource(ToyDataConfig(**SMALL, seed=8))
    b3 = src.batch(3)
    assert b3.shape == (64, 16)
    assert torch.equal(src.features, again.features)
    assert torch.equal(b3, again.batch(3)) and torch.equal(b3, src.batch(3))
    src.batch(10)  # drawing other batches in between changes nothing
    assert torch.equal(b3, src.batch(3))
    assert not torch.equal(b3, src.batch(4))
    assert not torch.equal(src.features, other.features)
    assert not torch.equal(b3, other.batch(3))
    x, acts = src.batch_and_acts(3)
    assert torch.equal(x, b3) and torch.allclose(x, acts @ src.features, atol=1e-5)


def test_iter_from_resumes_the_same_stream():
    src = ToyDataSource(ToyDataConfig(**SMALL))
    full = list(src.iter_from(0, n_steps=6))
    tail = list(src.iter_from(2, n_steps=4))
    assert len(full) == 6 and len(tail) == 4
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))
    it = iter(src)
    assert torch.equal(next(it), full[0]) and torch.equal(next(it), full[1])


def test_sample_uses_the_given_generator():
    src = ToyDataSource(ToyDataConfig(**SMALL))
    a = src.sample(10, torch.Generator().manual_seed(3))
    b = src.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, acts = src.sample(0)
    assert x.shape == (0, 16) and acts.shape == (0, 48)


@pytest.mark.parametrize("bad", [
    dict(decay_kind="linear"), dict(decay=1.5), dict(decay_kind="power", decay=-1.0),
    dict(mean_active=0.0), dict(mean_active=100.0), dict(correlation=1.0), dict(d=0),
    dict(noise_std=-1.0),
])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        ToyDataSource(ToyDataConfig(**{**SMALL, **bad}))
    with pytest.raises(ConfigError):
        ToyDataSource(ToyDataConfig(**SMALL)).batch(-1)
