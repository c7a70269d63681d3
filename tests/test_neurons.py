"""MLP neurons as a dictionary (seed 004): the identity dictionary reads exactly the model's
hidden activations and writes with W_out; densities and dead / dense / single-token counts match
a direct computation; single-token classification on crafted activations; `saelab neurons`."""

import json
import math

import pytest
import torch

from saelab import cli
from saelab.errors import ConfigError
from saelab.evals.metrics import DENSE_THRESHOLD
from saelab.experiments.neurons import census_row, run_neurons
from saelab.interpret.lens import residual_directions
from saelab.interpret.neurons import neuron_dictionary
from saelab.interpret.report import ReportOptions, build_report
from saelab.interpret.scan import SINGLE_TOKEN_SHARE, FeatureScan, ScanConfig
from saelab.interpret.sources import feature_acts
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # GELU with Conv1D weights; gated SiLU with nn.Linear
@pytest.mark.parametrize("sign", [1, -1])
def test_identity_dictionary_reads_the_hidden_activations_and_writes_with_w_out(tiny_hf_model_dirs, arch, sign):
    lm = HookedLM.load(tiny_hf_model_dirs[arch])
    tokens = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    d = neuron_dictionary(lm, 1, sign)
    assert (d.cfg.hook_name, d.cfg.hook_name_out) == ("blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out")
    cache = lm.run_with_cache(tokens, [d.cfg.hook_name, d.cfg.hook_name_out])
    a = sign * cache[d.cfg.hook_name]
    assert (a < 0).any() and (a > 0).any()  # neurons of both signs: "active" has to choose
    f = feature_acts(d, lm, tokens)  # what the report's scan and examples read
    assert torch.equal(f, torch.where(a > 0, a, torch.zeros_like(a)))
    w = lm.mlp_weights(1)
    assert torch.equal(d.W_dec, sign * w.W_out) and torch.equal(residual_directions(d, lm), sign * w.W_out)
    assert torch.equal(d.b_dec, w.b_out if w.b_out is not None else torch.zeros(lm.d_model))
    with torch.no_grad():  # all neurons: the decoder rebuilds the MLP output
        assert torch.allclose(a @ d.W_dec + d.b_dec, cache[d.cfg.hook_name_out], atol=1e-5)
    with pytest.raises(ConfigError, match=r"layer must be in 0\.\.1"):
        neuron_dictionary(lm, 2)


def _scan(f, tokens, **config):
    scan = FeatureScan(f.shape[-1], 10, ScanConfig(**config))
    scan.update(f, tokens, torch.arange(len(tokens)))
    return scan


@pytest.mark.parametrize("config", [{}, {"token_table_max": 1, "token_capacity": 3}])  # exact table, then slots
def test_single_token_share_on_crafted_activations(config):
    tokens = torch.tensor([[5, 6, 5, 7, 5, 6, 8, 5, 9, 5]])
    f = torch.zeros(1, 10, 5)
    on5, on6, on7 = tokens[0] == 5, tokens[0] == 6, tokens[0] == 7
    f[0, on5, 0] = 2.0  # all of its mass on token 5
    f[0, on5, 1], f[0, on6, 1] = 9.1 / 5, 0.9 / 2  # 91% on token 5: single-token
    f[0, on5, 2], f[0, on6, 2] = 8.9 / 5, 1.1 / 2  # 89%: not
    f[0, on5, 4], f[0, on6, 4], f[0, on7, 4] = 1 / 5, 1 / 2, 1.0  # a third on each of three tokens
    share = _scan(f, tokens, **config).top_token_share()
    assert share[[0, 1, 2, 4]].tolist() == pytest.approx([1.0, 0.91, 0.89, 1 / 3], abs=1e-6)
    assert math.isnan(share[3])  # dead: no mass to share
    assert ((share > SINGLE_TOKEN_SHARE).nonzero().flatten().tolist()) == [0, 1]


def test_density_and_counts_match_direct_computation(tiny_lm, tmp_path):
    contexts = torch.randint(0, tiny_lm.d_vocab, (10, 16), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = tiny_lm.bos_token_id
    d = neuron_dictionary(tiny_lm, 0)
    report = build_report(d, tiny_lm, contexts, features=[0, 1], ablate_max_back=2, progress=False)
    a = tiny_lm.run_with_cache(contexts, [d.cfg.hook_name])[d.cfg.hook_name][:, 1:]  # BOS not scanned
    active = (a > 0).flatten(0, 1)
    density = active.double().mean(0)
    got = torch.tensor([f.density for f in report.features], dtype=torch.float64)
    assert torch.allclose(got, density, rtol=1e-3) and report.n_tokens == active.shape[0]
    mass = torch.zeros(d.cfg.d_sae, tiny_lm.W_E.shape[0], dtype=torch.float64)
    ids = contexts[:, 1:].flatten()
    for j in range(d.cfg.d_sae):
        mass[j].index_add_(0, ids, a.flatten(0, 1)[:, j].clamp_min(0).double())
    share = mass.max(1).values / mass.sum(1)
    row = census_row("neurons", report, tiny_lm.W_E.shape[0])
    assert row["dense"] == int((density > DENSE_THRESHOLD).sum()) and row["dead"] == int((density == 0).sum())
    assert row["single_token"] == int((share > SINGLE_TOKEN_SHARE).sum()) and row["single_token_exact"]
    for f, want in zip(report.features, share.tolist()):
        assert (f.top_token_share is None) if math.isnan(want) else f.top_token_share == pytest.approx(want, rel=2e-3)


def test_run_neurons_with_an_sae_to_compare(tiny_lm, tmp_path):
    torch.manual_seed(0)
    sae = SAE(tiny_lm.d_model, 48, arch="topk", k=4, hook_name="blocks.0.hook_mlp_out")
    opts = ReportOptions(n_contexts=6, context_length=16, features=[2], ablate_max_back=2)
    res = run_neurons(tiny_lm, 0, tmp_path, opts, compare=sae, compare_name="sae", progress=False)
    assert res.index == tmp_path / "index.html" and (tmp_path / "compare_sae" / "report.json").is_file()
    census = json.loads((tmp_path / "census.json").read_text())
    assert [r["dictionary"] for r in census["rows"]] == ["layer 0 neurons", "sae"]
    assert census["rows"][0]["n"] == tiny_lm.d_mlp and census["rows"][1]["n"] == 48
    index = json.loads((tmp_path / "report.json").read_text())
    assert index["sae"]["arch"] == "mlp neurons" and index["single_token_share"] == SINGLE_TOKEN_SHARE
    assert "single-token" in (tmp_path / "index.html").read_text()
    assert [p.name for p in (tmp_path / "features").glob("*.html")] == ["2.html"]


def test_cli(tiny_lm_path, tmp_path, capsys):
    base = ["neurons", "--model", str(tiny_lm_path), "--scan-contexts", "6", "--context-length", "16",
            "--features", "0", "3", "--ablate-back", "2", "--out", str(tmp_path / "n")]
    assert cli.main(base + ["--layer", "5"]) == 2
    assert "error: layer must be in 0..1, got 5" in capsys.readouterr().err
    SAE(32, 16, hook_name="blocks.1.hook_resid_post").save(tmp_path / "sae")
    assert cli.main(base + ["--layer", "1", "--compare-sae", str(tmp_path / "sae")]) == 0
    printed = capsys.readouterr().out
    assert "| layer 1 neurons | blocks.1.mlp.hook_post |" in printed and f"| {tmp_path / 'sae'} |" in printed
    assert sorted(p.name for p in (tmp_path / "n" / "features").glob("*.html")) == ["0.html", "3.html"]
