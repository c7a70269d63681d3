"""Ablated text: batched, right-padded, multi-example forwards against one forward per
shortened sequence at its natural length."""

import math

import pytest
import torch

from saelab.errors import ConfigError, DataError
from saelab.interpret.ablate import AblationRequest, ablate_tokens
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

HOOK = "blocks.0.hook_resid_post"


def _setup(path, hook=HOOK):
    lm = HookedLM.load(path)
    torch.manual_seed(0)
    sae = SAE(lm.d_model, 10, arch="relu", hook_name=hook)
    with torch.no_grad():
        sae.W_enc.normal_()
    return lm, sae


def _act(lm, sae, tokens, feature, hook=HOOK):
    """Feature activation at the last position of `tokens`, one unpadded forward."""
    x = lm.run_with_cache(tokens[None], [hook])[hook][0, -1]
    return sae.encode(x)[feature].item()


@pytest.mark.parametrize("max_back", [None, 4])  # without and with shared prefixes (kv cache)
@pytest.mark.parametrize("arch,hook", [("gpt_neox", HOOK), ("gpt2", HOOK), ("llama", HOOK),
                                       ("gpt_neox_sequential", "blocks.1.hook_attn_out"),
                                       ("gpt2", "blocks.1.ln2.hook_normalized")])
def test_batched_ablation_matches_one_sequence_at_a_time(tiny_hf_model_dirs, arch, hook, max_back):
    """Rotary and learned positions, a later layer; rows of one example split across forwards."""
    lm, sae = _setup(tiny_hf_model_dirs[arch], hook)
    g = torch.Generator().manual_seed(1)
    ctx = [torch.randint(0, 64, (16,), generator=g) for _ in range(3)]
    reqs = [AblationRequest(ctx[0], 9, 3), AblationRequest(ctx[1], 4, 7), AblationRequest(ctx[2], 15, 3),
            AblationRequest(ctx[0], 0, 1), AblationRequest(ctx[2], 9, 5)]
    out = ablate_tokens(lm, sae, reqs, max_rows=7, max_back=max_back)
    for req, res in zip(reqs, out):
        prefix = req.tokens[:req.pos + 1]
        first = 0 if max_back is None else max(0, req.pos - max_back)
        assert res.base == pytest.approx(_act(lm, sae, prefix, req.feature, hook), abs=1e-5)
        assert res.ablated.shape == (req.pos + 1,) and math.isnan(res.ablated[req.pos])
        for t in range(req.pos):
            shortened = torch.cat([prefix[:t], prefix[t + 1:]])
            want = _act(lm, sae, shortened, req.feature, hook) if t >= first else math.nan
            assert res.ablated[t].item() == pytest.approx(want, abs=1e-5, nan_ok=True)
        delta = res.delta()
        assert delta[-1] is None and [d is not None for d in delta[:-1]] == [t >= first for t in range(req.pos)]
        assert all(d == pytest.approx(a - res.base) for d, a in zip(delta, res.ablated.tolist()[:-1]) if d is not None)
    assert out[3].delta() == [None]  # position 0: nothing earlier to remove


def test_shared_prefixes_run_once(tiny_hf_model_dirs, monkeypatch):
    """With max_back, each example's common first tokens go through the model once, not once
    per ablated sequence: 6 examples at p = 15, max_back 3 feed 6 * 12 prefix tokens and
    6 * 4 rows of 4 tail tokens, instead of 6 * 4 rows of 16."""
    lm, sae = _setup(tiny_hf_model_dirs["gpt_neox"])
    g = torch.Generator().manual_seed(4)
    reqs = [AblationRequest(torch.randint(0, 64, (16,), generator=g), 15, f) for f in range(6)]
    tokens, real = [], lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: tokens.append(k["input_ids"].numel()) or real(*a, **k))
    ablate_tokens(lm, sae, reqs, max_back=3)
    assert sum(tokens) == 6 * 12 + 6 * 4 * 4


def test_max_back_limits_the_removed_tokens(tiny_hf_model_dirs):
    lm, sae = _setup(tiny_hf_model_dirs["gpt_neox"])
    tokens = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2))
    full, = ablate_tokens(lm, sae, [AblationRequest(tokens, 10, 2)])
    part, = ablate_tokens(lm, sae, [AblationRequest(tokens, 10, 2)], max_back=3)
    assert [d is None for d in part.delta()] == [True] * 7 + [False] * 3 + [True]
    torch.testing.assert_close(part.ablated[7:10], full.ablated[7:10])
    assert part.base == full.base


def test_errors(tiny_hf_model_dirs):
    lm, sae = _setup(tiny_hf_model_dirs["gpt_neox"])
    tokens = torch.arange(2, 10)
    with pytest.raises(DataError, match=r"position 8 is out of range .* 0\.\.7"):
        ablate_tokens(lm, sae, [AblationRequest(tokens, 8, 0)])
    with pytest.raises(DataError, match="out of range"):
        ablate_tokens(lm, sae, [AblationRequest(tokens, -1, 0)])
    with pytest.raises(ConfigError, match=r"feature 10 is out of range \(valid: 0\.\.9\)"):
        ablate_tokens(lm, sae, [AblationRequest(tokens, 3, 10)])
    sae.cfg.hook_name = None
    with pytest.raises(ConfigError, match="hook_name"):
        ablate_tokens(lm, sae, [AblationRequest(tokens, 3, 1)])


def test_many_examples_share_few_forwards(tiny_hf_model_dirs, monkeypatch):
    """6 examples x 16 sequences (base + 15 removals) in ceil(96 / max_rows) forwards of the real
    model, with the same numbers as ablating each example on its own."""
    lm, sae = _setup(tiny_hf_model_dirs["gpt2"])
    g = torch.Generator().manual_seed(3)
    reqs = [AblationRequest(torch.randint(0, 64, (16,), generator=g), 15, f) for f in range(6)]
    alone = [ablate_tokens(lm, sae, [r])[0] for r in reqs]
    forwards, real = [], lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    together = ablate_tokens(lm, sae, reqs, max_rows=40)
    assert len(forwards) == math.ceil(6 * 16 / 40) == 3
    for one, batched in zip(alone, together):
        assert batched.base == pytest.approx(one.base, abs=1e-5)
        torch.testing.assert_close(batched.ablated, one.ablated, equal_nan=True, atol=1e-5, rtol=1e-5)
