"""Downstream metrics checked against computations made another way: explicit formulas on
small logits, and the HF model run with plain torch hooks that zero / mean / replace a module
(the KL that lands in metrics.json included: explicit float64 sums over the vocabulary)."""

import math

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError, DataError
from saelab.evals.downstream import (
    ablation_splice, compare_splices, evaluate_downstream, hook_means, keep_bos, loss_recovered,
    sae_splices, splice_loss,
)
from saelab.lm.hooked import HookedLM, next_token_ce
from saelab.lm.resolve import check_sae_fits
from saelab.sae import SAE

ARCHS = ("gpt_neox", "gpt2", "llama")


@pytest.fixture(scope="module", params=ARCHS)
def lm(request, tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs[request.param])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))


def hf_ce(lm, tokens, start=0):
    """Mean next-token CE of the bare HF model (whatever torch hooks are on it)."""
    with torch.no_grad():
        logits = lm.model(input_ids=tokens, use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1)[:, start:].mean().item()


def identity_sae(d: int, hook: str) -> SAE:
    """relu(x) - relu(-x) = x exactly: encoder [I, -I], decoder [I; -I], zero biases."""
    sae = SAE(d, 2 * d, hook_name=hook)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int, hook: str, **kw) -> SAE:
    sae = SAE(d, 8, hook_name=hook, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def replace_output(module, fn):
    """A plain torch forward hook replacing a module's output (or output[0])."""
    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)
    return module.register_forward_hook(hook)


# ---- formulas ------------------------------------------------------------------------------
def test_next_token_ce_matches_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits, toks = torch.randn(2, 4, 7, generator=gen), torch.randint(0, 7, (2, 4), generator=gen)
    got = next_token_ce(logits, toks)
    logp = torch.log_softmax(logits, -1)
    want = torch.tensor([[-logp[b, t, toks[b, t + 1]].item() for t in range(3)] for b in range(2)])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(next_token_ce(logits, toks, start=1), want[:, 1:], atol=1e-6)  # no prediction at BOS
    assert torch.allclose(next_token_ce(logits.half(), toks).double(), want.double(), atol=1e-2)  # fp16 in, fp32 out


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert loss_recovered(2.0, 2.0, 4.0) == 1.0 and loss_recovered(2.0, 4.0, 4.0) == 0.0
    assert math.isnan(loss_recovered(2.0, 2.5, 2.0))


def test_keep_bos_restores_position_zero():
    act = torch.randn(2, 4, 3)
    out = keep_bos(torch.zeros_like)(act)
    assert torch.equal(out[:, 0], act[:, 0]) and torch.equal(out[:, 1:], torch.zeros(2, 3, 3))


# ---- splices against the HF model with plain torch hooks -----------------------------------
@pytest.mark.parametrize("point", ["hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post"])
def test_identity_splice_reproduces_clean_loss_exactly(lm, tokens, point):
    res = splice_loss(lm, tokens, f"blocks.0.{point}", lambda a: a.clone(), batch_size=4)
    assert res["ce"] == res["ce_clean"] and res["kl"] == 0.0
    assert res["ce_clean"] == pytest.approx(lm.loss(tokens).item(), abs=1e-6)
    assert res["n_tokens"] == 6 * 11


def test_zero_ablation_equals_torch_hook_route(lm, tokens):
    mlp = lm.blocks[1].get_submodule(lm.arch.mlp)
    handle = replace_output(mlp, torch.zeros_like)
    try:
        want = hf_ce(lm, tokens)
    finally:
        handle.remove()
    got = splice_loss(lm, tokens, "blocks.1.hook_mlp_out", ablation_splice("zero"))
    assert got["ce"] == pytest.approx(want, abs=1e-5)
    assert got["ce"] != pytest.approx(got["ce_clean"], abs=1e-7)


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_mean_ablation_equals_torch_hook_route(lm, tokens, exclude_bos):
    start = int(exclude_bos)
    with torch.no_grad():
        hidden = lm.model(input_ids=tokens, output_hidden_states=True).hidden_states[1]
    mean = hidden[:, start:].double().mean((0, 1)).float()

    def to_mean(out):
        new = mean.expand_as(out).clone()
        if exclude_bos:
            new[:, 0] = out[:, 0]
        return new

    handle = replace_output(lm.blocks[0], to_mean)
    try:
        want = hf_ce(lm, tokens, start)
    finally:
        handle.remove()
    sae = zero_sae(lm.d_model, "blocks.0.hook_resid_post")
    [entry] = evaluate_downstream(lm, [sae], tokens, batch_size=4, exclude_bos=exclude_bos)
    assert entry.ablations["mean"].ce == pytest.approx(want, abs=1e-5)
    assert entry.ce_clean == pytest.approx(hf_ce(lm, tokens, start), abs=1e-6)
    assert entry.downstream_tokens == 6 * (11 - start)


def test_transcoder_splice_equals_torch_hook_route(lm, tokens):
    torch.manual_seed(0)
    tc = SAE(lm.d_model, 40, d_out=lm.d_model, hook_name="blocks.0.ln2.hook_normalized",
             hook_name_out="blocks.0.hook_mlp_out")
    with torch.no_grad():
        tc.b_enc.fill_(0.1)
    mlp = lm.blocks[0].get_submodule(lm.arch.mlp)
    seen = []
    pre = mlp.register_forward_pre_hook(lambda _m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
    post = replace_output(mlp, lambda out: tc(seen[-1]))
    try:
        want = hf_ce(lm, tokens)
    finally:
        pre.remove()
        post.remove()
    [entry] = evaluate_downstream(lm, [tc], tokens, ablations=("zero",))
    assert entry.ce_sae == pytest.approx(want, abs=1e-5)
    assert entry.splice_hook == "blocks.0.hook_mlp_out"
    assert list(entry.ablations) == ["zero"] and "ce_mean" not in entry.to_dict()


def test_several_saes_identity_is_one_zero_is_zero(lm, tokens):
    d, h = lm.d_model, "blocks.0.hook_resid_post"
    saes = [identity_sae(d, h), zero_sae(d, h), identity_sae(lm.d_mlp, "blocks.1.mlp.hook_post"),
            zero_sae(d, "blocks.1.ln2.hook_normalized", d_out=d, hook_name_out="blocks.1.hook_mlp_out")]
    ident, zero, hidden, tc = (e.to_dict() for e in evaluate_downstream(lm, saes, tokens, batch_size=4))
    assert ident["loss_recovered"] == 1.0 and ident["loss_recovered_mean"] == 1.0
    assert ident["ce_sae"] == ident["ce_clean"] and ident["kl"] == 0.0 and ident["ce_delta"] == 0.0
    assert zero["loss_recovered"] == 0.0 and zero["ce_sae"] == zero["ce_zero"]
    assert zero["kl"] == zero["kl_zero"] > 0
    assert hidden["loss_recovered"] == 1.0
    assert tc["loss_recovered"] == 0.0 and tc["splice_hook"] == "blocks.1.hook_mlp_out"
    assert ident["ce_zero"] == zero["ce_zero"] != tc["ce_zero"]


def kl_by_explicit_sum(clean: torch.Tensor, spliced: torch.Tensor, start: int) -> tuple[float, int]:
    """Mean over predicting positions start..seq-2 of sum_v p_v (log p_v - log q_v), float64,
    one position at a time; and the number of positions."""
    total, count = 0.0, 0
    for b in range(clean.shape[0]):
        for t in range(start, clean.shape[1] - 1):
            logp = clean[b, t].double() - clean[b, t].double().logsumexp(0)
            logq = spliced[b, t].double() - spliced[b, t].double().logsumexp(0)
            total += sum(p * (lp - lq) for p, lp, lq in zip(logp.exp().tolist(), logp.tolist(), logq.tolist()))
            count += 1
    return total / count, count


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_kl_in_metrics_equals_torch_hook_reference(lm, tokens, exclude_bos):
    """The KL written to metrics.json against a reference built without HookedLM: the SAE
    spliced by a plain forward hook on the HF block, KL summed explicitly in float64. An
    off-by-one between positions (or in which positions count) moves it far past 1e-5."""
    torch.manual_seed(1)
    hook = "blocks.0.hook_resid_post"
    sae = SAE(lm.d_model, 64, hook_name=hook)

    def splice(out):
        with torch.no_grad():
            new = sae(out)
        return torch.cat([out[:, :1], new[:, 1:]], 1) if exclude_bos else new

    with torch.no_grad():
        clean = lm.model(input_ids=tokens, use_cache=False).logits
        handle = replace_output(lm.blocks[0], splice)
        try:
            spliced = lm.model(input_ids=tokens, use_cache=False).logits
        finally:
            handle.remove()
    want, count = kl_by_explicit_sum(clean, spliced, int(exclude_bos))
    assert want > 1e-3  # a random SAE moves the predictions
    [entry] = evaluate_downstream(lm, [sae], tokens, batch_size=4, exclude_bos=exclude_bos)
    assert entry.kl == pytest.approx(want, rel=1e-5) and entry.downstream_tokens == count
    res = compare_splices(lm, [tokens[:1], tokens[1:]], {"sae": sae_splices(lm, sae)}, exclude_bos=exclude_bos)
    assert res["sae"]["kl"] == pytest.approx(want, rel=1e-5)


def test_batching_does_not_change_results(lm, tokens):
    variants = {"z": {"blocks.0.hook_attn_out": ablation_splice("zero")}}
    one = compare_splices(lm, tokens, variants, batch_size=1)
    all_ = compare_splices(lm, [tokens[:2], tokens[2:]], variants)
    for name in ("clean", "z"):
        assert one[name]["ce"] == pytest.approx(all_[name]["ce"], abs=1e-6)
    assert one["z"]["kl"] == pytest.approx(all_["z"]["kl"], abs=1e-6)


def test_hook_means_match_cache(lm, tokens):
    hooks = ["blocks.0.hook_attn_out", "blocks.1.mlp.hook_post"]
    got = hook_means(lm, tokens, hooks, batch_size=4, exclude_bos=True)
    cache = lm.run_with_cache(tokens, hooks)
    for h in hooks:
        assert torch.allclose(got[h], cache[h][:, 1:].mean((0, 1)), atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(lm, tokens):
    with pytest.raises(ConfigError, match=r"d_in is 5 but blocks\.0\.hook_resid_post .* is 32 wide"):
        evaluate_downstream(lm, [SAE(5, 8, hook_name="blocks.0.hook_resid_post")], tokens)
    backwards = SAE(32, 8, d_out=32, hook_name="blocks.1.hook_mlp_out", hook_name_out="blocks.0.hook_mlp_out")
    with pytest.raises(ConfigError, match="after the input hook"):
        check_sae_fits(lm, backwards)
    with pytest.raises(ConfigError, match="hook_name"):
        sae_splices(lm, SAE(32, 8))
    with pytest.raises(ConfigError, match="unknown ablation"):
        evaluate_downstream(lm, [zero_sae(32, "blocks.0.hook_resid_post")], tokens, ablations=("noise",))
    with pytest.raises(ConfigError, match="unknown hook name"):
        splice_loss(lm, tokens, "blocks.9.hook_mlp_out", torch.zeros_like)
    with pytest.raises(DataError, match="seq >= 3"):
        splice_loss(lm, tokens[:, :2], "blocks.0.hook_mlp_out", torch.zeros_like, exclude_bos=True)


def per_variant_reference(lm, tokens, variants, start):
    """The path compare_splices replaced: a full forward per variant, (b, seq, vocab) logits,
    log-softmax over all of them at once, CE and KL from those (float64 sums)."""
    from saelab.evals.downstream import _kl
    from saelab.lm.hooked import next_token_logprobs, next_token_nll

    with torch.no_grad():
        logp = next_token_logprobs(lm.forward(tokens), start)
        out = {"clean": next_token_nll(logp, tokens, start).double().mean().item()}
        for name, splices in variants.items():
            wrapped = {h: keep_bos(fn) for h, fn in splices.items()} if start else splices
            logq = next_token_logprobs(lm.forward(tokens, wrapped), start)
            out[name] = (next_token_nll(logq, tokens, start).double().mean().item(),
                         _kl(logp.exp(), logp, logq).double().mean().item())
    return out


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_shared_pass_equals_per_variant_forwards(lm, tokens, exclude_bos, monkeypatch):
    """Variants resuming at blocks 0 and 1, at the final norm, a transcoder-style pair, and a
    splice at the embedding (no resume): the same CE and KL as full forwards, with chunks of
    5 positions (chunks straddle contexts)."""
    import saelab.evals.downstream as ds

    monkeypatch.setattr(ds, "CHUNK_BYTES", 5 * 4 * lm.d_vocab)
    seen = []
    variants = {
        "mlp1": {"blocks.1.hook_mlp_out": lambda a: 0.3 * a},
        "resid0": {"blocks.0.hook_resid_post": lambda a: a + 0.5 * a.roll(1, -1)},
        "final": {"ln_final.hook_normalized": lambda a: a.flip(-1)},
        "pair": {"blocks.0.hook_resid_pre": lambda a: seen.append(a) or a,
                 "blocks.1.hook_attn_out": lambda a: a + seen[-1]},
        "embed": {"hook_embed": lambda a: a.roll(1, -1)},
    }
    start = int(exclude_bos)
    got = compare_splices(lm, tokens, variants, batch_size=4, exclude_bos=exclude_bos)
    ref_batches = [per_variant_reference(lm, t, variants, start) for t in tokens.split(4)]
    sizes = [t.shape[0] for t in tokens.split(4)]
    mean = lambda xs: sum(x * s for x, s in zip(xs, sizes)) / sum(sizes)  # noqa: E731
    assert got["clean"]["ce"] == pytest.approx(mean([r["clean"] for r in ref_batches]), rel=1e-6)
    for name in variants:
        assert got[name]["ce"] == pytest.approx(mean([r[name][0] for r in ref_batches]), rel=1e-6), name
        assert got[name]["kl"] == pytest.approx(mean([r[name][1] for r in ref_batches]), rel=1e-4, abs=1e-7), name
        assert got[name]["kl"] > 1e-6, name  # every variant changed something


def test_variant_passes_skip_the_blocks_before_their_splice(lm, tokens):
    """A variant spliced at block 1 never runs block 0 (the clean pass ran it once per batch)."""
    calls = []
    handle = lm.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        compare_splices(lm, tokens, {f"v{i}": {"blocks.1.hook_mlp_out": lambda a, i=i: a * i} for i in range(3)},
                        batch_size=3)
    finally:
        handle.remove()
    assert len(calls) == 2  # two batches, the clean pass each


def test_evaluate_on_lm_takes_the_means_from_the_reconstruction_pass(lm, tokens, monkeypatch):
    """The mean-ablation baseline summed from the reconstruction pass's rows is hook_means's,
    exactly, and evaluate_on_lm runs no pass of its own for it."""
    import saelab.evals.downstream as ds
    from saelab.evals.reconstruction import TargetMeans, evaluate_on_lm, lm_batches

    saes = [zero_sae(lm.d_model, "blocks.1.hook_resid_post"), zero_sae(lm.d_model, "blocks.0.hook_mlp_out"),
            zero_sae(lm.d_model, "blocks.1.hook_resid_post")]
    means = TargetMeans([s.cfg.hook_name for s in saes])
    for _ in means.tap(lm_batches(lm, saes, tokens, batch_size=4, exclude_bos=True)):
        pass
    got = means.result(lm.W_E.dtype)
    want = hook_means(lm, tokens, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"], batch_size=4, exclude_bos=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    reference = evaluate_downstream(lm, saes, tokens, batch_size=4, exclude_bos=True)
    monkeypatch.setattr(ds, "hook_means", lambda *a, **k: pytest.fail("a pass for the means"))
    evaluations = evaluate_on_lm(lm, saes, tokens, batch_size=4)
    assert [e.downstream for e in evaluations] == reference
