"""Logit lens: the folded final norm against finite differences of the real model, moments and
kinds on known distributions, token masks."""

import argparse
import json

import numpy as np
import pytest
import torch

from saelab.commands import logit_lens
from saelab.errors import ConfigError, DataError
from saelab.interpret.lens import (classify, feature_lens, fold_final_norm, logit_weights, moments,
                                   residual_directions)
from saelab.interpret.vocab import high_norm_tokens, token_strings, used_token_ids, vocab_mask
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE


@pytest.fixture(scope="module")
def lms(tiny_hf_model_dirs):
    return {a: HookedLM.load(tiny_hf_model_dirs[a]) for a in ("gpt_neox", "llama")}


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_folded_norm_is_the_logit_derivative(lms, arch):
    """For x with (centred) x orthogonal to (centred) d, sigma(x + e d) is even in e, so the
    central difference of unembed(x + e d) is exactly proportional, with a positive factor, to
    logit_weights(d), at any e (a large one: Llama's RMSNorm computes in float32)."""
    lm = lms[arch]
    torch.manual_seed(0)
    d, x = torch.randn(lm.d_model, dtype=torch.float64), torch.randn(lm.d_model, dtype=torch.float64) * 3
    centre = arch == "gpt_neox"  # LayerNorm centres, RMSNorm does not
    pd = d - d.mean() if centre else d
    px = x - x.mean() if centre else x
    x = x - (px @ pd) / (pd @ pd) * pd
    lm.model.double()
    try:
        eps = 0.1
        fd = (lm.unembed(x + eps * d) - lm.unembed(x - eps * d)) / (2 * eps)
        lens = logit_weights(d[None], lm)[0]
    finally:
        lm.model.float()
    ratio = fd / lens
    assert ratio.min() > 0
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-4, atol=0)


def test_fold_formula_by_hand():
    norm = torch.nn.LayerNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
    d = torch.tensor([[1.0, 2.0, 6.0]])  # mean 3 -> centred (-2, -1, 3) -> times gain
    torch.testing.assert_close(fold_final_norm(d, norm), torch.tensor([[-2.0, -2.0, -3.0]]))


def test_residual_directions(lms):
    lm = lms["gpt_neox"]
    sae = SAE(lm.d_model, 8, hook_name="blocks.0.hook_resid_post")
    assert torch.equal(residual_directions(sae, lm), sae.W_dec.detach())
    mlp = SAE(lm.d_mlp, 8, hook_name="blocks.1.mlp.hook_post")
    want = mlp.W_dec.detach() @ lm.mlp_weights(1).W_out
    torch.testing.assert_close(residual_directions(mlp, lm), want)
    with pytest.raises(ConfigError, match="no direct path"):
        residual_directions(SAE(lm.d_mlp, 8, hook_name="blocks.1.mlp.hook_pre"), lm)


def _np_moments(row):
    m = row.mean()
    s = np.sqrt(((row - m) ** 2).mean())
    return (((row - m) / s) ** 3).mean(), (((row - m) / s) ** 4).mean()


def test_moments_and_kinds_on_known_distributions():
    V = 1000
    spike = torch.zeros(V)
    spike[:5] = 10.0
    half = torch.cat([torch.zeros(V // 2), torch.ones(V // 2)])
    gauss = torch.randn(V, generator=torch.Generator().manual_seed(0))
    rows = torch.stack([spike, -spike, half, gauss, torch.zeros(V)])
    skew, kurt = moments(rows)
    for i in range(4):
        s, k = _np_moments(rows[i].double().numpy())
        assert skew[i].item() == pytest.approx(s) and kurt[i].item() == pytest.approx(k)
    assert kurt[2].item() == pytest.approx(1.0)  # a 50/50 two-level split
    assert skew[4] == 0 and kurt[4] == 0  # a zero row has no shape
    kinds = [classify(s, k) for s, k in zip(skew.tolist(), kurt.tolist())]
    assert kinds == ["prediction", "suppression", "partition", "other", "other"]
    m = torch.zeros(V, dtype=torch.bool)
    m[:500] = True  # the zero half of `half`: constant there
    assert moments(half[None], m)[1].item() == 0


def test_feature_lens_top_bottom_and_chunking(lms):
    lm = lms["gpt_neox"]
    torch.manual_seed(1)
    sae = SAE(lm.d_model, 12, hook_name="blocks.1.hook_resid_post")
    mask = torch.ones(lm.d_vocab, dtype=torch.bool)
    mask[torch.tensor([3, 7, 11])] = False
    res = feature_lens(sae, lm, features=[2, 5, 9], k=4, mask=mask, chunk=2)
    w = logit_weights(sae.W_dec.detach()[[2, 5, 9]], lm)
    for n, row in enumerate(w):
        allowed = [(v, t) for t, v in enumerate(row.tolist()) if mask[t]]
        assert res.top_ids[n].tolist() == [t for _, t in sorted(allowed, reverse=True)[:4]]
        assert res.bottom_ids[n].tolist() == [t for _, t in sorted(allowed)[:4]]
        s, k = _np_moments(row[mask].double().numpy())
        assert res.skew[n].item() == pytest.approx(s, rel=1e-4)
        assert res.kurtosis[n].item() == pytest.approx(k, rel=1e-4)
    whole = feature_lens(sae, lm, k=4, mask=mask)
    assert torch.equal(whole.top_ids[[2, 5, 9]], res.top_ids)
    with pytest.raises(ConfigError, match="out of range"):
        feature_lens(sae, lm, features=[12])


def test_vocab_helpers(lms):
    lm = lms["gpt_neox"]
    assert token_strings(lm.tokenizer, 66)[2:4] == ["w2", "w3"]
    assert token_strings(lm.tokenizer, 66)[64:] == ["<id 64>", "<id 65>"]
    used = used_token_ids(torch.tensor([[1, 3], [3, 5]]), 8)
    assert used.tolist() == [False, True, False, True, False, True, False, False]
    with pytest.raises(DataError, match="0..7"):
        used_token_ids(torch.tensor([[9]]), 8)
    W = torch.randn(16, 200, generator=torch.Generator().manual_seed(0))
    W[:, 18] *= 30
    assert torch.nonzero(high_norm_tokens(W, 6.0)).flatten().tolist() == [18]
    keep = vocab_mask(200, tokenizer_size=150, used=torch.arange(200) % 2 == 0, W=W, high_norm_z=6.0)
    assert keep.sum() == 74 and not keep[150:].any() and keep[16] and not keep[18] and not keep[1]
    with pytest.raises(DataError, match="no token ids left"):
        vocab_mask(4, used=torch.zeros(4, dtype=torch.bool))


def test_drop_unused_lists_only_tokens_of_the_text(tiny_hf_model_dirs, tmp_path, capsys):
    """`logit-lens --drop-unused TEXT` on a word-level model whose text uses exactly 9 ids
    (<bos>, w2..w9), listing k=5 each way. Without the option 10 distinct ids are listed (top
    and bottom 5 of 64 never meet), so at least one is unused; with it, the 5 + 5 come from
    those 9 alone, so they are all of them (the middle one listed twice)."""
    model = tiny_hf_model_dirs["gpt_neox"]
    torch.manual_seed(0)
    SAE(32, 8, hook_name="blocks.1.hook_resid_post").save(tmp_path / "sae")
    text = tmp_path / "words.txt"
    text.write_text("w2 w3 w4 w5 w6 w7 w8 w9 " * 8)
    used = {"<bos>"} | {f"w{i}" for i in range(2, 10)}

    def listed(*extra):
        parser = argparse.ArgumentParser()
        logit_lens.register(parser.add_subparsers())
        args = parser.parse_args(["logit-lens", str(tmp_path / "sae"), "--model", str(model),
                                  "--feature", "3", "-k", "5", "--json", *extra])
        assert args.func(args) == 0
        out, = json.loads(capsys.readouterr().out)
        return [t for t, _ in out["top"] + out["bottom"]]

    without = listed()
    assert len(set(without)) == 10 and set(without) - used
    assert set(listed("--drop-unused", str(text))) == used


def test_weight_histogram_bins_each_row_between_its_extremes():
    from saelab.interpret.lens import weight_histogram

    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    counts, span = weight_histogram(w, 4)
    assert span.tolist() == [[0.0, 4.0], [5.0, 5.0]]
    assert counts.tolist() == [[1, 1, 1, 3], [6, 0, 0, 0]]  # the max in the last bin; a constant row in the first
    x = torch.randn(3, 500)
    counts, span = weight_histogram(x, 10)
    for row, c, (lo, hi) in zip(x, counts, span.tolist()):
        want = torch.histc(row, bins=10, min=lo, max=hi)
        assert c.sum() == 500 and (c - want.long()).abs().max() <= 1  # histc differs only at bin edges
