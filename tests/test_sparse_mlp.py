"""Sparse MLPs end to end on the tiny trained LM (its layer-0 MLP matters: zeroing it costs
~0.5 nats), plus the pieces checked on their own: neuron matching, activation collection,
resumable batches, and the `saelab sparse-mlp` / `saelab perturb` commands."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from saelab.data.corpus import token_contexts
from saelab.commands import perturb as perturb_cmd
from saelab.commands import sparse_mlp as sparse_cmd
from saelab.errors import ConfigError, DataError
from saelab.experiments.sparse_mlp import (
    PairBatches, SparseMLPConfig, chance_cosines, collect_activations, cosine_summary,
    neuron_cosines, run_sparse_mlp,
)
from saelab.sae import SAE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .jsonl of real text (some standard-library modules' source), one document per module."""
    import inspect
    import argparse as a, calendar, csv, difflib, json as j, os, random, shutil, string, textwrap

    mods = [a, calendar, csv, difflib, j, os, random, shutil, string, textwrap]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = []
    for m in mods:
        src = inspect.getsource(m)
        lines += [json.dumps({"text": src[i:i + 4000]}) for i in range(0, len(src), 4000)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="module")
def tokens(lm, corpus):
    """(train, held-out) contexts of 32 tokens from the corpus."""
    def contexts(split, n):
        return token_contexts(str(corpus), lm.tokenizer, 32, split=split, holdout_frac=0.3, max_contexts=n)
    return contexts("train", 256), contexts("heldout", 32)


@pytest.mark.slow
def test_end_to_end_loss_recovered_and_outputs(lm, tokens, tmp_path):
    cfg = SparseMLPConfig(d_sae=256, k=[16], steps=150, batch_tokens=256, lr=3e-3)
    entries = run_sparse_mlp(lm, *tokens, tmp_path, cfg)
    assert [e["layer"] for e in entries] == [0, 1]
    e0 = entries[0]
    assert e0["ce_zero"] - e0["ce_clean"] > 0.2  # the layer-0 MLP matters in this model
    assert 0.6 < e0["loss_recovered"] <= 1.05 and e0["fvu"] < 0.3 and e0["l0"] == pytest.approx(16)
    want = (e0["ce_zero"] - e0["ce_sae"]) / (e0["ce_zero"] - e0["ce_clean"])
    assert e0["loss_recovered"] == pytest.approx(want, rel=1e-12)
    assert e0["downstream_tokens"] == 32 * 30  # BOS prediction left out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["name"] for s in saved] == [e["name"] for e in entries]
    sae = SAE.load(tmp_path / e0["sae_path"])
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    hists = json.loads((tmp_path / "neuron_cosines.json").read_text())
    h = hists[f"layer0/{e0['name']}"]
    assert sum(h["enc_hist_counts"]) == sum(h["dec_hist_counts"]) == e0["n_alive"] > 0
    assert (tmp_path / "neuron_cosines.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | " in (tmp_path / "report.md").read_text()


def test_neuron_cosines_find_an_exact_copy(lm):
    torch.manual_seed(0)
    w = lm.mlp_weights(1)
    sae = SAE(lm.d_model, 20, d_out=lm.d_model)
    with torch.no_grad():
        sae.W_enc[:, 3] = 2.5 * w.W_in[:, 7]
        sae.W_dec[3] = 0.3 * w.W_out[7]
    cos = neuron_cosines(sae, w)
    assert cos["enc"][3].item() == pytest.approx(1.0, abs=1e-6)
    assert cos["dec"][3].item() == pytest.approx(1.0, abs=1e-6)
    # every other neuron: brute force over all pairs in float64
    enc, win = sae.W_enc.detach().double(), w.W_in.double()
    brute = torch.tensor([max(F.cosine_similarity(enc[:, i], win[:, j], dim=0).item() for j in range(win.shape[1]))
                          for i in range(20)], dtype=torch.float64)
    assert torch.allclose(cos["enc"].double(), brute, atol=1e-5)
    with pytest.raises(ConfigError, match="maps"):
        neuron_cosines(SAE(lm.d_model, 4, d_out=7), w)


def test_cosine_summary_and_chance():
    cos = {"enc": torch.tensor([0.95, 0.5, -0.2, 0.99]), "dec": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    s = cosine_summary(cos, torch.tensor([True, True, False, True]))
    assert s["n_alive"] == 3
    assert s["enc_cos_mean"] == pytest.approx((0.95 + 0.5 + 0.99) / 3)
    assert s["enc_cos_frac_above_0.9"] == pytest.approx(2 / 3)
    assert sum(s["dec_hist_counts"]) == 3 and len(s["hist_edges"]) == len(s["enc_hist_counts"]) + 1
    assert cosine_summary(cos, torch.zeros(4, dtype=torch.bool))["enc_cos_mean"] == pytest.approx(0.56)
    w = type("W", (), {"W_in": torch.eye(4), "W_out": torch.eye(4)})()
    chance = chance_cosines(w, 2000)  # best |coordinate| / norm of Gaussian vectors in 4 dims
    g = torch.randn(20000, 4, generator=torch.Generator().manual_seed(9))
    assert chance["enc_chance"] == pytest.approx((g.amax(1) / g.norm(dim=1)).mean().item(), abs=0.02)


def test_collect_activations_aligned_with_cache(lm, tokens):
    toks = tokens[1][:5, :10]
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    got = collect_activations(lm, toks, hooks, batch_size=2)
    cache = lm.run_with_cache(toks, hooks)
    for h in hooks:
        assert got[h].shape == (5 * 9, lm.d_model)
        assert torch.allclose(got[h], cache[h][:, 1:].reshape(-1, lm.d_model), atol=1e-6)
    assert collect_activations(lm, toks, hooks, exclude_bos=False)[hooks[0]].shape[0] == 50


def test_pair_batches_cover_epochs_and_resume():
    x = torch.arange(10.0).unsqueeze(1)
    src = PairBatches(x, -x, batch_size=3, seed=1)
    it = iter(src)
    first = [next(it) for _ in range(7)]
    for bx, by in first:
        assert torch.equal(by, -bx)
    epoch0 = torch.cat([b[0] for b in first[:3]]).flatten()
    assert len(set(epoch0.tolist())) == 9  # 3 full batches per epoch, no repeats
    resumed = src.iter_from(4)
    for want in first[4:]:
        assert torch.equal(next(resumed)[0], want[0])
    with pytest.raises(DataError, match="fewer than one batch"):
        PairBatches(x, x, batch_size=11)
    with pytest.raises(DataError, match="rows"):
        PairBatches(x, x[:5], batch_size=2)


def test_bad_layers(lm, tokens, tmp_path):
    with pytest.raises(ConfigError, match=r"layers must be in 0\.\.1"):
        run_sparse_mlp(lm, *tokens, tmp_path, SparseMLPConfig(layers=[2]))


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.mark.slow
def test_commands_run(tiny_lm_path, corpus, tmp_path, capsys):
    common = ["--model", str(tiny_lm_path), "--source", str(corpus), "--context-length", "16",
              "--eval-contexts", "8"]
    args = _parse(sparse_cmd, ["sparse-mlp", *common, "--layers", "0", "--d-sae", "64", "--k", "4",
                               "--steps", "10", "--batch-tokens", "64", "--train-contexts", "40",
                               "--out", str(tmp_path / "sm")])
    assert args.func(args) == 0
    [entry] = json.loads((tmp_path / "sm" / "metrics.json").read_text())
    assert entry["layer"] == 0 and entry["d_sae"] == 64
    sae_dir = tmp_path / "sm" / entry["sae_path"]
    args = _parse(perturb_cmd, ["perturb", str(sae_dir) + "/", "--cos", "0.5", "0.9", *common])
    assert args.func(args) == 0  # no --out: the default is a folder beside the SAE's
    result = json.loads((sae_dir.parent / f"{sae_dir.name}-perturb" / "perturb.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["sae", "random_matched", "random", "random"]
    assert "random_matched" in capsys.readouterr().out
