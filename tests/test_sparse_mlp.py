"""Sparse MLPs end to end on the tiny trained LM (its layer-0 MLP matters: zeroing it costs
~0.5 nats), plus the pieces checked on their own: neuron matching, the report, and the
`saelab sparse-mlp` / `saelab perturb` commands. (Its training batches, `live_batches(...,
in_memory=True)`, are checked in test_cache.py.)"""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from saelab.data.corpus import token_contexts
from saelab.commands import perturb as perturb_cmd
from saelab.commands import sparse_mlp as sparse_cmd
from saelab.errors import ConfigError
from saelab.evals.entry import MetricsEntry
from saelab.experiments.sparse_mlp import (
    SparseMLPConfig, chance_cosines, cosine_summary, format_report, neuron_cosines, run_sparse_mlp,
)
from saelab.sae import SAE


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
    assert [e.extra[0].layer for e in entries] == [0, 1]
    e0 = entries[0].to_dict()
    assert e0["ce_zero"] - e0["ce_clean"] > 0.2  # the layer-0 MLP matters in this model
    assert 0.6 < e0["loss_recovered"] <= 1.05 and e0["fvu"] < 0.3 and e0["l0"] == pytest.approx(16)
    want = (e0["ce_zero"] - e0["ce_sae"]) / (e0["ce_zero"] - e0["ce_clean"])
    assert e0["loss_recovered"] == pytest.approx(want, rel=1e-12)
    assert e0["downstream_tokens"] == 32 * 30 and e0["n_tokens"] == 32 * 31  # BOS position left out
    assert e0["n_alive"] == e0["d_sae"] - e0["dead"]  # alive = fired on the held-out tokens
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == [e.to_dict() for e in entries] and not {"enc_hist_counts", "hist_edges"} & set(saved[0])
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


def test_report_shows_each_row():
    row = MetricsEntry.from_dict({
        "name": "topk_64_k4", "n_tokens": 10, "mse": 1.0, "fvu": 0.25, "explained_variance": 0.75, "cos": 0.9,
        "l0": 4.0, "dead": 3, "ce_clean": 3.0, "ce_sae": 3.5, "kl": 0.125, "ce_delta": 0.5, "ce_zero": 4.0,
        "kl_zero": 1.0, "loss_recovered": 0.5, "ce_mean": 3.5, "kl_mean": 0.5, "loss_recovered_mean": float("nan"),
        "downstream_tokens": 9, "exclude_bos": True, "splice_hook": "blocks.1.hook_mlp_out",
        "layer": 1, "enc_cos_mean": 0.5, "enc_chance": 0.25, "dec_cos_mean": 0.75, "dec_chance": 0.125})
    lines = format_report([row], "tiny").splitlines()
    assert lines[0] == "# Sparse MLPs on tiny" and lines[-3].startswith("| layer | SAE | L0 |")
    assert lines[-1] == ("| 1 | topk_64_k4 | 4.0 | 0.250 | 3 | 3.0000 | 4.0000 | 3.5000 | 50.0% | nan | 0.1250 "
                         "| 0.500 (0.250) | 0.750 (0.125) |")


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
    assert args.func(args) == 0  # no --out: beside the SAE, in its run folder (never in saes/)
    result = json.loads((sae_dir.parent.parent / f"{sae_dir.name}-perturb" / "perturb.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["sae", "random_matched", "random", "random"]
    assert "random_matched" in capsys.readouterr().out
