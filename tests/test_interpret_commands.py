"""`saelab logit-lens` and `saelab tokens`: their output against the library calls."""

import argparse
import json

import pytest
import torch

from saelab.commands import dashboard, logit_lens, tokens
from saelab.data.cache import cache_activations
from saelab.errors import ConfigError, DataError
from saelab.interpret.embedding import feature_vectors, nearest_tokens
from saelab.interpret.lens import feature_lens
from saelab.interpret.report import build_report
from saelab.interpret.vocab import vocab_mask
from saelab.sae import SAE
from tests.dashboard_files import read_dashboard_json


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def sae_dir(tiny_lm, tiny_lm_path, tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(tiny_lm.d_model, 16, hook_name="blocks.1.hook_resid_post", model_name=str(tiny_lm_path))
    folder = tmp_path_factory.mktemp("cmd") / "sae"
    sae.save(folder)
    return folder, SAE.load(folder)


def test_logit_lens_command(tiny_lm, sae_dir, capsys):
    folder, sae = sae_dir
    assert _run(logit_lens, ["logit-lens", str(folder), "--feature", "3", "11", "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mask = vocab_mask(tiny_lm.d_vocab, tokenizer_size=len(tiny_lm.tokenizer))
    want = feature_lens(sae, tiny_lm, [3, 11], k=4, mask=mask)
    assert [o["feature"] for o in out] == [3, 11] and [o["kind"] for o in out] == want.kinds()
    for o, ids in zip(out, want.top_ids.tolist()):
        assert [t for t, _ in o["top"]] == [tiny_lm.tokenizer.decode([i]) for i in ids]
    assert _run(logit_lens, ["logit-lens", str(folder), "--feature", "3", "--no-fold-norm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("feature 3: ") and "kurtosis" in text
    with pytest.raises(ConfigError, match="out of range"):
        _run(logit_lens, ["logit-lens", str(folder), "--feature", "16"])


def test_drop_unused(tiny_lm, sae_dir, tmp_path, capsys):
    folder, _ = sae_dir
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    used = set(tiny_lm.tokenizer.encode(text.read_text()))
    allowed = {tiny_lm.tokenizer.decode([i]) for i in used | {tiny_lm.bos_token_id}}
    argv = ["logit-lens", str(folder), "--feature", "2", "-k", "3", "--json"]
    listed = []
    for extra in ([], ["--drop-unused", str(text)]):
        assert _run(logit_lens, argv + extra) == 0
        out, = json.loads(capsys.readouterr().out)
        listed.append({t for t, _ in out["top"] + out["bottom"]})
    assert not listed[0] <= allowed  # without the option, tokens the text never uses are listed
    assert listed[1] <= allowed


def test_tokens_command(tiny_lm, sae_dir, capsys):
    folder, sae = sae_dir
    argv = ["tokens", str(folder), "--feature", "5", "--vector", "decoder", "--scale", "2", "--exponent", "2",
            "-k", "6", "--tree", "--depth", "2", "--breadth", "2", "--unfiltered", "--json"]
    assert _run(tokens, argv) == 0
    out, = json.loads(capsys.readouterr().out)
    mask = vocab_mask(tiny_lm.W_E.shape[0], tokenizer_size=len(tiny_lm.tokenizer))
    ids, _ = nearest_tokens(tiny_lm, feature_vectors(tiny_lm, sae, [5], "decoder", 2.0, mask), k=6,
                            exponent=2.0, mask=mask)
    assert [t for t, _ in out["decoder"]] == [tiny_lm.tokenizer.decode([i]) for i in ids[0].tolist()]
    assert "encoder" not in out and len(out["tree"]["children"]) == 2
    assert _run(tokens, ["tokens", str(folder), "--feature", "5", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "encoder:" in text and "decoder:" in text


def test_dashboard_from_a_cache(tiny_lm, sae_dir, tmp_path, capsys):
    """`--cache`: the dashboard's report is build_report's from that cache (all of its contexts
    by default, the first --scan-contexts when given); a cache without the SAE's hook is an error."""
    folder, sae = sae_dir
    contexts = torch.randint(0, tiny_lm.d_vocab, (7, 16), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = tiny_lm.bos_token_id
    cache = cache_activations(tiny_lm, contexts, [sae.cfg.hook_name], tmp_path / "cache", progress=False)
    out = tmp_path / "dash"
    argv = ["dashboard", str(folder), "--cache", str(cache.path), "--features", "1", "4", "--lm-batch-size", "3",
            "--out", str(out)]
    assert _run(dashboard, argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "index.html")]
    want = build_report(folder, None, cache=cache.path, n_contexts=None, features=[1, 4], batch_size=3,
                        progress=False)
    got = read_dashboard_json(out)  # the same computation twice: a consistency check of the command
    assert got == json.loads(json.dumps(want.to_dict())) and got["n_tokens"] == 7 * 15
    assert _run(dashboard, argv + ["--scan-contexts", "2", "--out", str(tmp_path / "two")]) == 0
    assert read_dashboard_json(tmp_path / "two")["n_tokens"] == 2 * 15
    other = cache_activations(tiny_lm, contexts, "blocks.0.hook_resid_post", tmp_path / "other", progress=False)
    with pytest.raises(DataError, match="has no activations for.*blocks.1.hook_resid_post.*it holds"):
        _run(dashboard, ["dashboard", str(folder), "--cache", str(other.path)])


def test_cache_command_writes_held_out_activations(tiny_lm, tiny_lm_path, tmp_path, capsys):
    """`saelab cache`: held-out contexts of the source, their activations at every hook as one
    forward gives them (BOS dropped), and a second run reuses the finished cache."""
    from saelab.cli import main
    from saelab.data.cache.read import open_cache
    from saelab.data.corpus import token_contexts

    text = tmp_path / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n"}) + "\n" for i in range(400)))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    argv = ["cache", "--model", str(tiny_lm_path), "--source", str(text), "--hooks", *hooks,
            "--cache-contexts", "6", "--context-length", "16", "--out", str(tmp_path / "c")]
    assert main(argv) == 0 and main(argv) == 0
    assert capsys.readouterr().out.count(f"{tmp_path / 'c'}: 6 contexts, 90 tokens") == 2
    cache = open_cache(tmp_path / "c", model=tiny_lm, hooks=hooks)
    want = token_contexts(str(text), tiny_lm.tokenizer, 16, split="heldout", max_contexts=6)
    assert torch.equal(cache.context_tokens(range(6)), want)
    direct = tiny_lm.run_with_cache(want, hooks)
    for hook in hooks:
        torch.testing.assert_close(cache.context_activations(range(6), hook), direct[hook][:, 1:])
    assert cache.manifest["meta"] == {"source": str(text), "split": "heldout"}
