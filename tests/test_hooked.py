"""Hook points checked against computations made another way: HF's own hidden states, the
residual-stream sums, the HF modules called directly, and equivalent splices at other hooks."""

import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError
from saelab.lm.hooked import HookedLM
from tests.conftest import TINY_ARCHS

ATOL = 1e-5


@pytest.fixture(scope="module", params=TINY_ARCHS)
def lm(request, tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs[request.param])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def b(layer, point):
    return f"blocks.{layer}.{point}"


def test_shapes_and_dims(lm, tokens):
    assert (lm.n_layers, lm.d_model, lm.d_vocab, lm.context_length, lm.bos_token_id) == (
        2, 32, 64, 16, 0)
    cache = lm.run_with_cache(tokens, lm.hook_names())
    for name, act in cache.items():
        assert act.shape[-1] == lm.hook_dim(name)
        assert act.shape[1] == tokens.shape[1]
    assert lm.d_mlp == lm.hook_dim("blocks.0.mlp.hook_post") != lm.d_model


def test_residual_stream_matches_hf_hidden_states(lm, tokens):
    cache = lm.run_with_cache(tokens, lm.hook_names())
    hidden = lm.model(tokens, output_hidden_states=True).hidden_states
    for layer in range(lm.n_layers):
        assert torch.equal(cache[b(layer, "hook_resid_pre")], hidden[layer])
    last = cache[b(lm.n_layers - 1, "hook_resid_post")]
    assert torch.allclose(lm.final_norm(last), hidden[-1], atol=ATOL)
    assert torch.equal(cache["ln_final.hook_normalized"], hidden[-1])
    assert torch.equal(cache[b(0, "hook_resid_post")], cache[b(1, "hook_resid_pre")])


def test_block_sums_and_mlp_internals(lm, tokens):
    cache = lm.run_with_cache(tokens, lm.hook_names())
    for layer, block in enumerate(lm.blocks):
        c = {p: cache.get(b(layer, p)) for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                   "hook_resid_post", "hook_resid_mid",
                                                   "ln2.hook_normalized", "mlp.hook_pre",
                                                   "mlp.hook_pre_linear", "mlp.hook_post")}
        total = c["hook_resid_pre"] + c["hook_attn_out"] + c["hook_mlp_out"]
        assert torch.allclose(c["hook_resid_post"], total, atol=ATOL)
        mlp_reads = c["hook_resid_pre"] if lm.parallel_residual else c["hook_resid_mid"]
        if not lm.parallel_residual:
            assert torch.allclose(mlp_reads, c["hook_resid_pre"] + c["hook_attn_out"], atol=ATOL)
        ln2 = block.get_submodule(lm.arch.ln2)
        assert torch.allclose(c["ln2.hook_normalized"], ln2(mlp_reads), atol=ATOL)
        assert torch.allclose(c["hook_mlp_out"], block.mlp(c["ln2.hook_normalized"]), atol=ATOL)
        w = lm.mlp_weights(layer)
        bias_in = 0 if w.b_in is None else w.b_in
        bias_out = 0 if w.b_out is None else w.b_out
        assert torch.allclose(c["mlp.hook_pre"], c["ln2.hook_normalized"] @ w.W_in + bias_in,
                              atol=ATOL)
        assert torch.allclose(c["hook_mlp_out"], c["mlp.hook_post"] @ w.W_out + bias_out,
                              atol=ATOL)
        act = block.mlp.act_fn if hasattr(block.mlp, "act_fn") else block.mlp.act
        hidden = act(c["mlp.hook_pre"])
        if w.W_up is not None:
            assert torch.allclose(c["mlp.hook_pre_linear"], c["ln2.hook_normalized"] @ w.W_up,
                                  atol=ATOL)
            hidden = hidden * c["mlp.hook_pre_linear"]
        assert torch.allclose(c["mlp.hook_post"], hidden, atol=ATOL)


def test_embedding_unembedding_accessors(lm, tokens):
    logits, cache = lm.run_with_cache(tokens, ["hook_embed", "ln_final.hook_normalized"],
                                      return_logits=True)
    assert torch.equal(cache["hook_embed"], lm.W_E[tokens])
    assert torch.allclose(logits, cache["ln_final.hook_normalized"] @ lm.W_U, atol=ATOL)
    resid = lm.run_with_cache(tokens, [b(1, "hook_resid_post")])[b(1, "hook_resid_post")]
    assert torch.allclose(lm.unembed(resid), logits, atol=ATOL)
    assert lm.W_U.shape == (lm.d_model, lm.d_vocab) and lm.W_E.shape == (64, lm.d_model)
    assert torch.equal(lm.forward(inputs_embeds=lm.embed(tokens)), lm.forward(tokens))


def test_ghost_token_gradient_flows_to_inputs_embeds(lm, tokens):
    emb = lm.embed(tokens).detach().requires_grad_(True)
    lm.forward(inputs_embeds=emb, grad=True)[:, -1, 3].sum().backward()
    assert emb.grad is not None and emb.grad[:, -1].abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())


def test_identity_splice_gives_exactly_clean_loss(lm, tokens):
    clean = lm.loss(tokens)
    for name in lm.hook_names():
        assert torch.equal(lm.loss(tokens, {name: lambda x: x.clone()}), clean), name
        assert torch.equal(lm.loss(tokens, {name: lambda x: x}), clean), name


def test_zero_splice_changes_loss(lm, tokens):
    clean = lm.loss(tokens)
    for name in (b(0, "hook_resid_post"), b(0, "hook_mlp_out"), b(1, "mlp.hook_post")):
        assert not torch.allclose(lm.loss(tokens, {name: torch.zeros_like}), clean), name
    # zeroing the whole residual stream leaves the model with no information: uniform logits
    # for models whose final norm has no bias (llama) or zero-initialised bias (the others)
    zeroed = lm.loss(tokens, {b(1, "hook_resid_post"): torch.zeros_like})
    assert torch.allclose(zeroed, torch.log(torch.tensor(64.0)), atol=1e-4)


def test_equivalent_splices_agree(lm, tokens):
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    add = lambda x: x + v  # noqa: E731
    pairs = [(b(0, "hook_resid_post"), b(1, "hook_resid_pre"))]
    if not lm.parallel_residual:
        pairs.append((b(1, "hook_attn_out"), b(1, "hook_resid_mid")))
    for first, second in pairs:
        assert torch.allclose(lm.forward(tokens, {first: add}), lm.forward(tokens, {second: add}),
                              atol=1e-4)
    # two splices in one pass compose: +v then -v at the next hook cancels
    both = lm.forward(tokens, {b(0, "hook_resid_post"): add,
                               b(1, "hook_resid_pre"): lambda x: x - v})
    assert torch.allclose(both, lm.forward(tokens), atol=1e-4)


def test_capture_sees_spliced_value(lm, tokens):
    name = b(0, "hook_mlp_out")
    cache = lm.run_with_cache(tokens, [name, b(0, "hook_resid_post")],
                              splices={name: torch.zeros_like})
    assert torch.equal(cache[name], torch.zeros_like(cache[name]))
    clean = lm.run_with_cache(tokens, [b(0, "hook_resid_post"), b(0, "hook_mlp_out")])
    assert torch.allclose(cache[b(0, "hook_resid_post")],
                          clean[b(0, "hook_resid_post")] - clean[name], atol=ATOL)


def test_early_stop_skips_later_layers_and_matches_full_pass(lm, tokens):
    calls = []
    handle = lm.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = lm.run_with_cache(tokens, [b(0, "hook_resid_post"), "hook_embed"])
        assert calls == []
        _, full = lm.run_with_cache(tokens, [b(0, "hook_resid_post"), "hook_embed"],
                                    return_logits=True)
        assert calls == [1]
    finally:
        handle.remove()
    assert early.keys() == full.keys()
    assert all(torch.equal(early[k], full[k]) for k in early)


def test_resumed_pass_skips_earlier_blocks_and_matches_full_pass(lm, tokens):
    """resume=(1, resid_pre of block 1) runs block 1 on: the same logits and activations as a
    full pass, spliced or not, and block 0 never runs."""
    pre = lm.run_with_cache(tokens, [b(1, "hook_resid_pre")])[b(1, "hook_resid_pre")]
    names = [b(1, "hook_attn_out"), "ln_final.hook_normalized"]
    for splices in ({}, {b(1, "hook_mlp_out"): lambda a: 0.5 * a}, {b(1, "hook_resid_mid"): torch.zeros_like}):
        if lm.parallel_residual and b(1, "hook_resid_mid") in splices:
            continue
        full_logits, full = lm.run_with_cache(tokens, names, splices=splices, return_logits=True)
        calls = []
        handle = lm.blocks[0].register_forward_hook(lambda *a: calls.append(1))
        try:
            logits, cache = lm.run_with_cache(tokens, names, splices=splices, return_logits=True, resume=(1, pre))
        finally:
            handle.remove()
        assert calls == []
        assert torch.allclose(logits, full_logits, atol=ATOL)
        assert all(torch.allclose(cache[k], full[k], atol=ATOL) for k in names)
    assert len(lm.blocks) == lm.n_layers == len(lm.model.get_submodule(lm.arch.blocks))  # put back
    assert lm.first_layer([b(1, "hook_mlp_out"), b(0, "hook_attn_out")]) == 0
    assert lm.first_layer(["ln_final.hook_normalized"]) == lm.n_layers
    assert lm.first_layer(["hook_embed", b(1, "hook_mlp_out")]) == 0
    with pytest.raises(ConfigError, match="cannot read or splice hooks before it"):
        lm.run_with_cache(tokens, [b(0, "hook_resid_post")], resume=(1, pre))
    with pytest.raises(ConfigError, match="resume needs a block in 0..1"):
        lm.run_with_cache(tokens, [b(1, "hook_resid_post")], resume=(2, pre))


def test_per_token_loss_matches_log_softmax(lm, tokens):
    per = lm.loss(tokens, per_token=True)
    logp = F.log_softmax(lm.forward(tokens), dim=-1)
    ref = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert per.shape == (3, 11)
    assert torch.allclose(per, ref, atol=ATOL)
    assert torch.allclose(lm.loss(tokens), ref.mean(), atol=ATOL)


def test_hooks_removed_even_after_errors(lm, tokens):
    def n_hooks():  # HF registers some hooks of its own: compare counts, not emptiness
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    before = n_hooks()
    with pytest.raises(ConfigError, match="shape"):
        lm.forward(tokens, {b(0, "hook_mlp_out"): lambda x: x[..., :3]})
    lm.run_with_cache(tokens, [b(0, "hook_resid_pre")])
    assert n_hooks() == before


def test_bad_names_and_inputs(lm, tokens):
    with pytest.raises(ConfigError, match="hook_resid_post"):
        lm.run_with_cache(tokens, ["blocks.0.hook_nonsense"])
    with pytest.raises(ConfigError, match="0..1"):
        lm.hook_dim("blocks.7.hook_resid_pre")
    if lm.parallel_residual:
        with pytest.raises(ConfigError, match="parallel"):
            lm.run_with_cache(tokens, ["blocks.0.hook_resid_mid"])
        assert "blocks.0.hook_resid_mid" not in lm.hook_names()
    with pytest.raises(DataError, match="token ids"):
        lm.loss(torch.tensor([[1, 2, 64]]))
    with pytest.raises(DataError, match="context length"):
        lm.loss(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(DataError):
        lm.loss(torch.rand(2, 5))
    with pytest.raises(ConfigError, match="exactly one"):
        lm.forward()


def test_load_errors(tmp_path, save_tiny_hf):
    with pytest.raises(MissingFileError, match="does not exist"):
        HookedLM.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="config.json"):
        HookedLM.load(empty)
    broken = save_tiny_hf("gpt2", tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="cannot load the weights .model.safetensors."):
        HookedLM.load(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="weights"):
        HookedLM.load(broken)



def _garbage(path):
    path.write_bytes(b"\x00\xff\xfe garbage \x89PNG")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


# (damage done to a saved folder, error type, the file the message must name, what it must say)
BROKEN_FOLDERS = {
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), MissingFileError,
                          "tokenizer", "no tokenizer file"),
    "no tokenizer files": (lambda d: [p.unlink() for p in d.glob("tokenizer*")], MissingFileError,
                           "tokenizer", "no tokenizer file"),
    "garbage tokenizer.json": (lambda d: _garbage(d / "tokenizer.json"), CorruptFileError,
                               "tokenizer.json", "not valid JSON"),
    "truncated tokenizer.json": (lambda d: _truncate(d / "tokenizer.json"), CorruptFileError,
                                 "tokenizer.json", "not valid JSON"),
    "wrong tokenizer.json": (lambda d: (d / "tokenizer.json").write_text('{"a": 1}'),
                             CorruptFileError, "tokenizer.json", "cannot load the tokenizer"),
    "garbage tokenizer_config.json": (lambda d: _garbage(d / "tokenizer_config.json"),
                                      CorruptFileError, "tokenizer_config.json", "not valid JSON"),
    "no config.json": (lambda d: (d / "config.json").unlink(), MissingFileError, "config.json",
                       "no config.json"),
    "garbage config.json": (lambda d: _garbage(d / "config.json"), CorruptFileError,
                            "config.json", "not valid JSON"),
    "truncated config.json": (lambda d: _truncate(d / "config.json"), CorruptFileError,
                              "config.json", "not valid JSON"),
    "config.json without model_type": (lambda d: (d / "config.json").write_text('{"n_embd": 32}'),
                                       CorruptFileError, "config.json", "model_type"),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_tokenizer_and_config_files(case, tiny_hf_model_dirs, tmp_path):
    """Each damage gives a saelab error naming the file and what is wrong (never a raw HF
    traceback, never a message that leaves the user guessing which file)."""
    damage, error, file, what = BROKEN_FOLDERS[case]
    folder = shutil.copytree(tiny_hf_model_dirs["gpt2"], tmp_path / "m")
    damage(folder)
    with pytest.raises(error, match=re.escape(what)) as info:
        HookedLM.load(folder)
    assert file in str(info.value) and str(folder) in str(info.value)


def test_unsupported_architecture_is_config_error(tmp_path, save_tiny_hf):
    from transformers import OPTConfig, OPTForCausalLM

    save_tiny_hf("gpt2", tmp_path)  # tokenizer files
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="gpt_neox"):
        HookedLM.load(tmp_path)


def test_load_dtype(tiny_hf_model_dirs, tokens):
    lm16 = HookedLM.load(tiny_hf_model_dirs["gpt_neox"], dtype=torch.bfloat16)
    assert lm16.W_E.dtype == torch.bfloat16
    act = lm16.run_with_cache(tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    assert act.dtype == torch.bfloat16


@pytest.mark.parametrize("name, layer, point", [
    ("blocks.0.hook_resid_post", 0, "hook_resid_post"),
    ("blocks.12.mlp.hook_post", 12, "mlp.hook_post"),
    ("blocks.3.ln2.hook_normalized", 3, "ln2.hook_normalized"),
    ("hook_embed", None, "hook_embed"),
    ("ln_final.hook_normalized", None, "ln_final.hook_normalized"),
])
def test_parse_hook_splits_layer_and_point(name, layer, point):
    from saelab.lm.hook_names import parse_hook

    assert parse_hook(name) == (layer, point)


@pytest.mark.parametrize("name", ["blocks.x.hook_resid_post", "blocks.1.hook_resid", "resid_post", "blocks.1"])
def test_parse_hook_names_the_valid_forms(name):
    from saelab.lm.hook_names import parse_hook

    with pytest.raises(ConfigError, match="valid forms are blocks.L.<point>"):
        parse_hook(name)


@pytest.mark.parametrize("name, layer", [("blocks.12.mlp.hook_post", 12), ("blocks.0.hook_resid_post", 0),
                                         ("hook_embed", None), ("resid_post", None), (None, None)])
def test_layer_of_is_the_block_or_none(name, layer):
    from saelab.lm.hook_names import layer_of

    assert layer_of(name) == layer


def test_resume_keeps_per_layer_attention_types():
    """Qwen2 with sliding-window layers reads config.layer_types by the loop's index: a pass
    resumed at block 2 still gives blocks 2 and 3 their sliding windows (the logits of a full pass)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                      use_sliding_window=True, sliding_window=3, max_window_layers=2)
    torch.manual_seed(0)
    lm = HookedLM(AutoModelForCausalLM.from_config(cfg))
    assert lm.model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    toks = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    full, cache = lm.run_with_cache(toks, ["blocks.2.hook_resid_pre"], return_logits=True)
    resumed, _ = lm.run_with_cache(toks, [], return_logits=True, resume=(2, cache["blocks.2.hook_resid_pre"]))
    assert torch.allclose(resumed, full, atol=ATOL)
    assert lm.model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
