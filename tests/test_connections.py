"""`saelab connections` (seed 002): activation x gradient from early to late features against
finite differences of the late feature's total (float64), the exact sum over a linear path that
needs the error node, ablation against a splice written another way, the bad inputs, and the
command from its options to its page."""

import json

import pytest
import torch

from saelab import cli
from saelab.errors import ConfigError
from saelab.experiments.connections import (ConnectionsConfig, ablation_effects, attribute, check_pair,
                                            counted_tokens, late_totals, run_connections, scale_node, spearman,
                                            zero_feature)
from saelab.experiments.connections_view import ConnectionsResult, write_outputs
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE


@pytest.fixture(scope="module")
def lm(tiny_hf_model_dirs):
    lm = HookedLM.load(tiny_hf_model_dirs["gpt2"])  # a private copy: cast to float64 below
    lm.model.double()
    return lm


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(1))


def _sae(d_in, d_sae, hook, seed, d_out=None, hook_out=None, model=None):
    torch.manual_seed(seed)
    sae = SAE(d_in, d_sae, d_out=d_out, hook_name=hook, hook_name_out=hook_out, model_name=model)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.normal_(0, 0.1)
    return sae.double().eval()


def _pairs(lm):
    d = lm.d_model
    saes = (_sae(d, 24, "blocks.0.hook_resid_post", 0), _sae(d, 20, "blocks.1.hook_resid_post", 1))
    transcoders = (_sae(d, 24, "blocks.0.ln2.hook_normalized", 2, d, "blocks.0.hook_mlp_out"),
                   _sae(d, 20, "blocks.1.ln2.hook_normalized", 3, d, "blocks.1.hook_mlp_out"))
    return {"saes": saes, "transcoders": transcoders}


@pytest.mark.parametrize("kind", ["saes", "transcoders"])
def test_attribution_is_the_derivative_of_scaling_the_node(lm, tokens, kind):
    pair = check_pair(lm, *_pairs(lm)[kind])
    late = [0, 5, 11]
    A, A_err, F = attribute(lm, pair, tokens, late)
    F_all = late_totals(lm, pair, tokens)
    assert torch.allclose(F, F_all[late], rtol=1e-10)
    eps = 1e-6
    order = A.abs().sum(0).argsort(descending=True)
    for node in [*order[:4].tolist(), "error"]:
        up = late_totals(lm, pair, tokens, scale_node(node, 1 + eps))
        down = late_totals(lm, pair, tokens, scale_node(node, 1 - eps))
        fd = ((up - down) / (2 * eps))[late]
        got = A_err if node == "error" else A[:, node]
        assert torch.allclose(got, fd, rtol=1e-5, atol=1e-8), (node, got, fd)
    assert A.abs().max() > 1e-3 and A_err.abs().max() > 1e-3  # not a vacuous comparison


def test_linear_path_sum_needs_the_error_node(lm, tokens):
    """Early SAE at blocks.0.hook_resid_post, late at blocks.1.hook_resid_pre (the same
    activation): on active tokens g_j = W_enc[:, j] . x + c_j, so the nodes' attributions sum to
    sum_active W_enc[:, j] . (x - b_dec_early), exactly."""
    early = _sae(lm.d_model, 24, "blocks.0.hook_resid_post", 0)
    late = _sae(lm.d_model, 20, "blocks.1.hook_resid_pre", 1)
    pair = check_pair(lm, early, late)
    feats = list(range(20))
    A, A_err, _ = attribute(lm, pair, tokens, feats)
    x = lm.run_with_cache(tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"][:, 1:]
    active = late.encode(x) > 0
    direct = (x - early.b_dec) @ late.W_enc  # (n, s, d_late)
    want = (direct * active).sum((0, 1))
    assert torch.allclose(A.sum(1) + A_err, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(A.sum(1), want, rtol=1e-3)  # the error node carries a real part


def test_ablation_is_the_feature_removed_from_the_activation(lm, tokens):
    early, late = _pairs(lm)["saes"]
    pair = check_pair(lm, early, late)
    cfg = ConnectionsConfig(batch_size=2)
    clean = late_totals(lm, pair, tokens)
    counted = torch.ones(tokens.shape, dtype=torch.bool)
    counted[:, 0] = False
    got = ablation_effects(lm, pair, tokens, [3, 7], [0, 4], cfg, clean, counted)
    for r, i in enumerate([3, 7]):
        def remove(act, i=i):
            f = early.encode(act)
            out = act - f[..., i:i + 1] * early.W_dec[i]
            out[:, 0] = act[:, 0]  # BOS is not a node
            return out
        x = lm.run_with_cache(tokens, [late.cfg.hook_name], splices={early.cfg.hook_name: remove})
        ablated = late.encode(x[late.cfg.hook_name])[:, 1:].sum((0, 1))
        assert torch.allclose(got[r], (clean - ablated)[[0, 4]], rtol=1e-9, atol=1e-12)
    assert bool((got != 0).any())
    assert torch.equal(zero_feature(2)(torch.ones(1, 3, 4), torch.ones(1, 3, 4))[0][0, :, 2], torch.tensor([1., 0., 0.]))


def test_left_out_tokens_are_neither_nodes_nor_targets(lm, tokens):
    pair = check_pair(lm, *_pairs(lm)["saes"])
    counted = torch.ones(tokens.shape, dtype=torch.bool)
    counted[:, 0] = False
    counted[1, 4:7] = False  # e.g. outlier rows
    A, A_err, F = attribute(lm, pair, tokens, [2, 9], counted=counted)
    assert torch.allclose(F, late_totals(lm, pair, tokens, counted=counted)[[2, 9]], rtol=1e-10)
    assert not torch.allclose(F, late_totals(lm, pair, tokens)[[2, 9]], rtol=1e-3)
    eps = 1e-6
    for node in [int(A.abs().sum(0).argmax()), "error"]:
        up, down = (late_totals(lm, pair, tokens, scale_node(node, 1 + d, counted=counted), counted=counted)
                    for d in (eps, -eps))
        fd = ((up - down) / (2 * eps))[[2, 9]]
        assert torch.allclose(A_err if node == "error" else A[:, node], fd, rtol=1e-5, atol=1e-8)


def test_outlier_rows_are_not_counted():
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    x[1, 3] *= 100  # a massive activation at the early hook
    y = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    y[0, 5] *= 100  # and one at the late hook
    got = counted_tokens({"early": x, "late": y}, exclude_bos=True, multiple=10.0)
    want = torch.ones(2, 6, dtype=torch.bool)
    want[:, 0] = want[1, 3] = want[0, 5] = False
    assert torch.equal(got, want)
    want[1, 3] = want[0, 5] = True
    assert torch.equal(counted_tokens({"early": x, "late": y}, exclude_bos=True, multiple=None), want)


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a[:2], a[:2]) is None


def test_bad_pairs(lm, tokens):
    early, late = _pairs(lm)["saes"]
    with pytest.raises(ConfigError, match="earlier layer's dictionary first"):
        check_pair(lm, late, early)
    with pytest.raises(ConfigError, match="earlier layer's dictionary first"):
        check_pair(lm, early, _sae(lm.d_model, 8, "blocks.0.hook_resid_post", 4))
    other = _sae(lm.d_model, 20, "blocks.1.hook_resid_post", 1, model="some/other-model")
    with pytest.raises(ConfigError, match="different models"):
        check_pair(lm, early, other)
    with pytest.raises(ConfigError, match=r"LATE features must be in 0\.\.19"):
        run_connections(lm, early, late, tokens, ConnectionsConfig(late_features=[3, 20]))
    wide = _sae(lm.d_model + 1, 8, "blocks.1.hook_resid_post", 5)
    with pytest.raises(ConfigError, match="not trained on this model"):
        check_pair(lm, early, wide)


@pytest.fixture(scope="module")
def folders(tiny_lm, tiny_lm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("conn")
    d, name = tiny_lm.d_model, str(tiny_lm_path)
    early = _sae(d, 32, "blocks.0.ln2.hook_normalized", 0, d, "blocks.0.hook_mlp_out", name).float()
    late = _sae(d, 32, "blocks.1.hook_resid_post", 1, model=name).float()
    early.save(root / "early")
    late.save(root / "late")
    return root


def test_command_writes_result_and_page(folders, corpus, capsys):
    out = folders / "out"
    argv = ["connections", str(folders / "early"), str(folders / "late"), "--source", str(corpus),
            "--eval-contexts", "4", "--context-length", "16", "--top-late", "5", "--ablate", "6", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "strongest connections" in printed and "agreement over 6 ablated" in printed
    result = ConnectionsResult.from_dict(json.loads((out / "connections.json").read_text()))
    assert len(result.late_features) == 5 and len(result.strongest) == 6
    assert all(c.ablation is not None for c in result.strongest)
    assert result.agreement.n == 6 and result.n_tokens == 4 * 15
    assert [abs(c.attribution) for c in result.strongest] == sorted((abs(c.attribution) for c in result.strongest),
                                                                    reverse=True)
    for lf in result.late_features:  # the share is over every early feature, so at most over the listed ones
        listed = abs(lf.error) + sum(abs(c.attribution) for c in lf.top)
        assert 0 < lf.error_share <= abs(lf.error) / listed + 1e-4
    page = (out / "index.html").read_text()
    c = result.strongest[0]
    assert f'href="../early/dashboard/features/{c.early}.html"' in page
    assert f'href="../late/dashboard/features/{c.late}.html"' in page
    assert "saelab dashboard" in page  # the dashboards are not built yet: the page says how
    assert (out / "static" / "dashboard.css").exists()
    assert json.loads((out / "connections.schema.json").read_text())["title"] == "saelab connections result"
    dash = folders / "late" / "dashboard"  # a built dashboard: only the pages it has are linked
    (dash / "features").mkdir(parents=True)
    (dash / "index.html").write_text("")
    (dash / "features" / f"{c.late}.html").write_text("")
    page = write_outputs(result, folders / "out2").read_text()
    others = [lf.feature for lf in result.late_features if lf.feature != c.late]
    assert f'href="../late/dashboard/features/{c.late}.html"' in page
    assert not any(f'href="../late/dashboard/features/{j}.html"' in page for j in others)


def test_command_bad_input(folders, corpus, capsys):
    base = ["--source", str(corpus), "--eval-contexts", "2", "--context-length", "8"]
    assert cli.main(["connections", str(folders / "late"), str(folders / "early"), *base]) == 2
    assert "give the earlier layer's dictionary first" in capsys.readouterr().err
    assert cli.main(["connections", str(folders / "early"), str(folders / "late"), "--features", "99", *base]) == 2
    assert "LATE features must be in 0..31" in capsys.readouterr().err
