"""Random perturbations at a given cosine: exact cosine and norm per token, and the experiment's
table checked against the SAE's cosine computed from cached activations."""

import json

import pytest
import torch

from saelab.errors import ConfigError
from saelab.experiments.perturb import PerturbConfig, perturb_at_cosine, perturbation_table, run_perturb
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("c", [-1.0, -0.3, 0.0, 0.5, 0.9, 0.999, 1.0])
def test_perturbation_hits_cosine_and_norm(c):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 48, generator=gen) * 30
    norm = torch.rand(4, 5, generator=gen) * 50 + 0.1
    xp = perturb_at_cosine(x, c, norm, torch.Generator().manual_seed(1))
    assert xp.shape == x.shape and xp.dtype == x.dtype
    assert torch.allclose(cosine(x, xp), torch.full((4, 5), c, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xp.double().norm(dim=-1), norm.double(), rtol=1e-6, atol=1e-5)


def test_per_token_cosines_and_randomness():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 16, generator=gen)
    c = torch.rand(200, generator=gen) * 2 - 1
    a = perturb_at_cosine(x, c, 1.0, torch.Generator().manual_seed(3))
    b = perturb_at_cosine(x, c, 1.0, torch.Generator().manual_seed(4))
    assert torch.allclose(cosine(x, a), c.double(), atol=1e-5)
    assert torch.allclose(a.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)  # a random direction, not a fixed one
    # the orthogonal part is isotropic: its mean direction over many tokens is near 0
    z = torch.zeros(5000, 16)
    z[:, 0] = 1.0
    r = perturb_at_cosine(z, 0.0, 1.0, torch.Generator().manual_seed(5))
    assert r[:, 0].abs().max() < 1e-6 and r[:, 1:].mean(0).abs().max() < 0.05


def test_zero_vector_and_bad_input():
    x = torch.zeros(3, 8)
    xp = perturb_at_cosine(x, 0.5, 2.0, torch.Generator().manual_seed(0))
    assert torch.allclose(xp.norm(dim=-1), torch.full((3,), 2.0), atol=1e-6)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        perturb_at_cosine(torch.randn(2, 4), 1.5, 1.0)
    with pytest.raises(ConfigError, match="1-dimensional"):
        perturb_at_cosine(torch.randn(2, 1), 0.5, 1.0)
    with pytest.raises(ConfigError, match="norm must be one of"):
        PerturbConfig(norm="unit")
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        PerturbConfig(cos_targets=[0.5, 2.0])


@pytest.fixture(scope="module")
def lm(tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs["gpt_neox"])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(2, 64, (8, 14), generator=torch.Generator().manual_seed(7))


def test_table_matches_cached_cosines(lm, tokens):
    torch.manual_seed(0)
    hook = "blocks.0.hook_resid_post"
    sae = SAE(lm.d_model, 64, hook_name=hook)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    cfg = PerturbConfig(cos_targets=[0.3, 0.9, 1.0], norm="input", batch_size=3)
    res = perturbation_table(lm, sae, tokens, cfg)
    rows = {(r["variant"], r["cos_target"]): r for r in res["rows"]}
    x = lm.run_with_cache(tokens, [hook])[hook][:, 1:]
    with torch.no_grad():
        want = cosine(x, sae(x)).mean().item()
    assert rows[("sae", None)]["cos"] == pytest.approx(want, abs=1e-5)
    assert rows[("random_matched", None)]["cos"] == pytest.approx(want, abs=1e-5)
    assert rows[("random_matched", None)]["norm_ratio"] == pytest.approx(rows[("sae", None)]["norm_ratio"], rel=1e-5)
    for c in (0.3, 0.9):
        assert rows[("random", c)]["cos"] == pytest.approx(c, abs=1e-5)
        assert rows[("random", c)]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("random", 1.0)]["kl"] < 1e-8  # x' = x
    assert rows[("random", 0.3)]["kl"] > rows[("random", 0.9)]["kl"] > 0
    assert res["n_tokens"] == 8 * 12 and res["hook"] == hook


def test_transcoder_and_run_folder(lm, tokens, tmp_path):
    torch.manual_seed(1)
    tc = SAE(lm.d_model, 48, d_out=lm.d_model, hook_name="blocks.1.ln2.hook_normalized",
             hook_name_out="blocks.1.hook_mlp_out")
    cfg = PerturbConfig(cos_targets=[0.5, 0.95], exclude_bos=False)
    res = run_perturb(lm, tc, tokens, tmp_path / "run", cfg, sae_path="somewhere")
    cache = lm.run_with_cache(tokens, [tc.cfg.hook_name, tc.cfg.hook_name_out])
    with torch.no_grad():
        want = cosine(cache[tc.cfg.hook_name_out], tc(cache[tc.cfg.hook_name])).mean().item()
    sae_row = next(r for r in res["rows"] if r["variant"] == "sae")
    assert sae_row["cos"] == pytest.approx(want, abs=1e-5)
    assert res["hook"] == "blocks.1.hook_mlp_out"
    saved = json.loads((tmp_path / "run" / "perturb.json").read_text())
    assert saved["rows"] == res["rows"] and saved["sae"] == "somewhere"
    assert (tmp_path / "run" / "kl_vs_cos.png").read_bytes()[:4] == b"\x89PNG"
    assert "random_matched" in (tmp_path / "run" / "table.md").read_text()
