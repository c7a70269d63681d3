"""Synthetic max-activating text (experiments/maximize.py, commands/maximize.py): the search finds
the best text of a feature built to fire on one token pair, reports what the SAE itself computes
on it, and its texts land on the feature's dashboard page."""

import json

import pytest
import torch

from saelab.cli import main
from saelab.errors import ConfigError
from saelab.experiments.maximize import (DatasetTop, MaximizeConfig, Scorer, dataset_top_from_scan, format_maximize,
                                         run_maximize)
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs["gpt_neox"])


@pytest.fixture(scope="module")
def pair_feature(lm):
    """(SAE, every two-token text, its activation): feature 2 points from the mean residual to the
    residual after one chosen pair, so the best two-token texts are known by brute force."""
    pairs = torch.tensor([[0, a, b] for a in range(2, 64) for b in range(2, 64)])
    x = lm.run_with_cache(pairs, [HOOK])[HOOK][:, -1]
    d = x[37 * 62 + 11] - x.mean(0)
    d = d / d.norm()
    sae = SAE(lm.d_model, 4, arch="relu", hook_name=HOOK)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.W_enc[:, 2] = d
        sae.b_enc[2] = -(x.mean(0) @ d)
    return sae, pairs, sae.encode(x)[:, 2].detach()


def test_search_finds_the_brute_force_best_pair(lm, pair_feature):
    sae, pairs, acts = pair_feature
    cfg = MaximizeConfig(feature=2, length=2, beam=4, lm_candidates=4, grad_candidates=6, lm_weight=0.0, top=3)
    result = run_maximize(lm, sae, cfg)
    best = result.texts[0]
    assert best.act == pytest.approx(float(acts.max()), abs=1e-6)
    assert result.evaluated < len(pairs) / 10  # found it without trying every pair
    # the reported activation is the SAE's own encode of that text, at its last token
    ids = torch.tensor([best.token_ids])
    again = sae.encode(lm.run_with_cache(ids, [HOOK])[HOOK])[0, :, 2].detach()
    assert best.act == pytest.approx(float(again[-1]), abs=1e-6)
    assert best.acts[1:] == pytest.approx(again[1:].tolist(), abs=1e-6)
    assert [t.act for t in result.texts] == sorted((t.act for t in result.texts), reverse=True)


def test_gradient_proposals_point_up(lm, pair_feature):
    """The gradient's first proposal raises the pre-activation more than the average token does."""
    sae, _, _ = pair_feature
    scorer = Scorer(lm, sae, 2)
    ids = torch.tensor([[0, 39]])
    proposed = scorer.gradient_tokens(torch.cat([lm.embed(ids), lm.W_E[2:].mean(0).expand(1, 1, -1)], 1), 3)[0, -1]
    every = torch.tensor([[0, 39, t] for t in range(2, 64)])
    _, z, _ = scorer.score(every, 64)
    assert float(z[proposed[0] - 2]) > float(z.mean())


def test_lm_weight_keeps_text_likely(lm, pair_feature):
    sae, _, _ = pair_feature
    free = run_maximize(lm, sae, MaximizeConfig(feature=2, length=3, beam=3, lm_weight=0.0, top=1)).texts[0]
    likely = run_maximize(lm, sae, MaximizeConfig(feature=2, length=3, beam=3, lm_weight=50.0, top=1)).texts[0]
    assert likely.mean_logprob > free.mean_logprob and free.act >= likely.act


def test_dataset_comparison_and_reasons(lm, pair_feature):
    sae, pairs, acts = pair_feature
    scorer = Scorer(lm, sae, 2)
    contexts = torch.randint(2, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = 0
    top = dataset_top_from_scan(scorer, contexts, batch=4)
    assert top.act == pytest.approx(float(scorer.all_positions(contexts)[:, 1:].max()), abs=1e-6)
    assert top.acts[-1] == pytest.approx(top.act, abs=1e-6) and len(top.tokens) == top.pos + 1
    cfg = MaximizeConfig(feature=2, length=2, beam=2, lm_weight=0.0)
    result = run_maximize(lm, sae, cfg, dataset=top)
    assert result.beats == (result.texts[0].act > top.act * (1 + 5e-4))
    same = DatasetTop(result.texts[0].act * (1 + 1e-4), [], [], 1, "rounded")
    tie = run_maximize(lm, sae, cfg, dataset=same)
    assert tie.beats is False and "same activation" in tie.why_not
    unbeatable = DatasetTop(1e9, ["<bos>"] * 20, [0.0] * 20, 19, "made up")
    result = run_maximize(lm, sae, cfg, dataset=unbeatable)
    assert result.beats is False and "raise --length" in result.why_not
    assert "not higher" in format_maximize(result)
    with pytest.raises(ConfigError, match="feature 4 is out of range"):
        run_maximize(lm, sae, MaximizeConfig(feature=4))


def test_texts_go_on_the_dashboard_page(tmp_path, lm, pair_feature):
    from saelab.interpret.dashboard import write_dashboard, write_synthetic
    from tests.test_dashboard import make_report

    sae, _, _ = pair_feature
    report = make_report()
    index = next(f["index"] for f in report["features"] if "examples" in f and not f["dead"])
    write_dashboard(report, tmp_path)
    result = run_maximize(lm, sae, MaximizeConfig(feature=2, length=2, beam=2, top=2))
    page = write_synthetic(tmp_path, index, result.to_dict())
    html = page.read_text()
    assert 'id="synthetic"' in html and result.texts[0].tokens[-1] in html
    write_dashboard(report, tmp_path)  # a rebuilt dashboard keeps them
    assert 'id="synthetic"' in (tmp_path / "features" / f"{index}.html").read_text()
    assert json.loads((tmp_path / "synthetic" / f"{index}.json").read_text())["feature"] == 2


def test_command_and_bad_input(tmp_path, lm, pair_feature, tiny_hf_model_dirs, capsys):
    sae, _, _ = pair_feature
    sae.save(tmp_path / "sae")
    model = str(tiny_hf_model_dirs["gpt_neox"])
    assert main(["maximize", str(tmp_path / "sae"), "--feature", "9", "--model", model]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["maximize", str(tmp_path / "sae"), "--feature", "2", "--model", model, "--length", "2",
                 "--beam", "2", "--source", str(_text(tmp_path)), "--context-length", "8", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "dataset's top example" in out and (tmp_path / "m" / "maximize.json").is_file()
    page = (tmp_path / "m" / "maximize.html").read_text()
    best = json.loads((tmp_path / "m" / "maximize.json").read_text())["texts"][0]
    assert page.count('class="ex"') == 1 + len(json.loads((tmp_path / "m" / "maximize.json").read_text())["texts"])
    assert f"{best['act']:.4g}" in page and "<script" not in page


def _text(tmp_path):
    path = tmp_path / "words.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 62 + 2}" for j in range(40))})
                              for i in range(40)))
    return path


def test_value_is_the_distance_to_firing(lm):
    """topk: the activation where the feature is among the k largest, else z minus the k-th
    largest z; relu: the activation, else z (its threshold is 0)."""
    torch.manual_seed(0)
    x = torch.randn(50, lm.d_model) * 4
    for arch, options in (("topk", {"k": 3}), ("relu", {})):
        sae = SAE(lm.d_model, 12, arch=arch, hook_name=HOOK, **options)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.05)
        for i in (0, 5):
            value, z, act = Scorer(lm, sae, i).value(x)
            zs = sae.pre_acts(x).detach()
            kth = zs.topk(3, -1).values[:, -1]
            threshold = kth.clamp(min=0) if arch == "topk" else torch.zeros(50)
            act = act.detach()
            want = torch.where(act > 0, act, (zs[:, i] - threshold).clamp(max=0))
            assert torch.allclose(value.detach(), want, atol=1e-5), (arch, i)
            assert ((act > 0) | (value <= 0)).all() and 0 < int((act > 0).sum()) < 50
