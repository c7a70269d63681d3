"""Perturbations across hooks (seed 002): each hook's curve is the single-hook experiment's,
whichever other hooks run beside it; the random perturbation keeps the norm and hits the target
cosine at every hook; an SAE's point is the one-SAE table's; the CLI writes the figure and
refuses SAEs of different models."""

import json

import pytest
import torch

from saelab import cli
from saelab.errors import ConfigError
from saelab.experiments.perturb import PerturbConfig, hook_perturbations, perturbation_table, run_hook_perturb
from saelab.experiments.perturb_views import summary_rows
from saelab.lm.hook_names import expand_hooks
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_one_model
from saelab.sae import SAE

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs["gpt2"])  # sequential blocks: every point exists


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(2, 64, (6, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sae(lm):
    torch.manual_seed(0)
    sae = SAE(lm.d_model, 64, hook_name=HOOK)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae


def _rows(result, hook):
    return [r for r in result["rows"] if r["hook"] == hook]


@pytest.mark.parametrize("norm", ["sae", "input"])
def test_each_hook_equals_its_single_hook_run(lm, tokens, sae, norm):
    cfg = PerturbConfig(cos_targets=[0.4, 0.9], norm=norm, batch_size=4, seed=3)
    hooks = expand_hooks(["layers"], lm.n_layers)
    both = hook_perturbations(lm, tokens, hooks, {"a": sae}, cfg)
    assert both["hooks"] == hooks and both["saes"] == {"a": HOOK}  # forward order, the SAE's hook among them
    for hook in ("blocks.0.hook_attn_out", HOOK, "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"):
        alone = hook_perturbations(lm, tokens, [hook], cfg=cfg)
        assert [r for r in _rows(both, hook) if r["sae"] is None] == alone["rows"]
        assert alone["ce_clean"] == both["ce_clean"]
    one = perturbation_table(lm, sae, tokens, cfg)  # the SAE alone: its point, and its curve for norm "sae"
    mine = [r for r in _rows(both, HOOK) if r["sae"] == "a" or norm == "input" and r["variant"] == "random"]
    assert [{k: v for k, v in r.items() if k not in ("hook", "sae")} for r in mine] == one["rows"]
    want = [("sae", "a"), ("random_matched", "a"), ("random", None), ("random", None)]
    want += [("random", "a"), ("random", "a")] if norm == "sae" else []  # a curve at the SAE's own norm too
    assert [(r["variant"], r["sae"]) for r in _rows(both, HOOK)] == want
    assert len(summary_rows(both)) == len(hooks) + (norm == "sae")  # the SAE's row (beside its hook's own curve)


def test_random_keeps_the_norm_and_hits_the_cosine_at_every_hook(lm, tokens):
    cfg = PerturbConfig(cos_targets=[0.2, 0.7, 0.95, 1.0], batch_size=6)
    hooks = ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_mid"]
    res = hook_perturbations(lm, tokens, hooks, cfg=cfg)
    assert len(res["rows"]) == len(hooks) * 4 and not res["saes"]
    for hook in hooks:
        rows = _rows(res, hook)
        for r in rows:
            assert r["sae"] is None and r["cos"] == pytest.approx(r["cos_target"], abs=1e-5)
            assert r["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
        kl = [r["kl"] for r in rows]
        assert kl[0] > kl[1] > kl[2] > 0 and kl[3] < 1e-8, (hook, kl)  # x' = x at cos 1


def test_two_saes_at_one_hook_share_the_input_norm_curve(lm, tokens, sae):
    torch.manual_seed(1)
    other = SAE(lm.d_model, 32, hook_name=HOOK)
    cfg = PerturbConfig(cos_targets=[0.5, 0.9], norm="input", batch_size=6)
    res = hook_perturbations(lm, tokens, [], {"a": sae, "b": other}, cfg)
    assert [(r["variant"], r["sae"]) for r in res["rows"]] == [("sae", "a"), ("random_matched", "a"), ("sae", "b"),
                                                               ("random_matched", "b"), ("random", None), ("random", None)]
    summary = summary_rows(res)
    assert [s["sae"] for s in summary] == ["a", "b"] and summary[0]["kl@0.5"] == summary[1]["kl@0.5"]
    sae_row = next(r for r in res["rows"] if r["variant"] == "sae" and r["sae"] == "b")
    matched = next(r for r in res["rows"] if r["variant"] == "random_matched" and r["sae"] == "b")
    assert summary[1]["sae_kl"] == sae_row["kl"] and summary[1]["ratio"] == pytest.approx(sae_row["kl"] / matched["kl"])


def test_expand_hooks():
    layer = ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert expand_hooks(["layers"], 2)[3:] == layer and len(expand_hooks(["layers"], 2)) == 6
    assert expand_hooks(["layers:1", "blocks.0.hook_resid_pre", "layers:1-1"], 3) == layer + ["blocks.0.hook_resid_pre"]
    assert len(expand_hooks(["layers:0,2-3"], 4)) == 9
    for bad, message in (("layers:2", r"layers must be in 0\.\.1"), ("layers:x", "not a list of layers"),
                         ("blocks.0.hook_nope", "is not a hook name")):
        with pytest.raises(ConfigError, match=message):
            expand_hooks([bad], 2)


def test_nothing_or_unknown_hooks(lm, tokens):
    with pytest.raises(ConfigError, match="nothing to perturb"):
        hook_perturbations(lm, tokens)
    with pytest.raises(ConfigError, match="unknown hook name"):
        hook_perturbations(lm, tokens, ["blocks.7.hook_mlp_out"])


def test_saes_of_different_models_are_refused():
    def made(name):
        return SAE(8, 16, hook_name=HOOK, model_name=name)
    check_one_model({"a": made(None), "b": made("default")})  # both the offline default LM
    with pytest.raises(ConfigError, match="different models: a from m1, b from m2"):
        check_one_model({"a": made("m1"), "b": made("m2")})


def test_run_folder(lm, tokens, sae, tmp_path):
    cfg = PerturbConfig(cos_targets=[0.5, 0.9], batch_size=6)
    res = run_hook_perturb(lm, tokens, tmp_path, ["layers:1"], {"a": sae}, cfg, {"a": "somewhere"})
    saved = json.loads((tmp_path / "perturb.json").read_text())
    assert saved["rows"] == res["rows"] and saved["sae_paths"] == {"a": "somewhere"}
    assert saved["hooks"] == [HOOK, "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert (tmp_path / "kl_vs_cos.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "table.md").read_text()
    assert "| blocks.1.hook_mlp_out | - | activation |" in table and "Every variant" in table


def test_cli(tiny_hf_model_dirs, tmp_path, capsys):
    SAE(32, 16, hook_name=HOOK, model_name="m1").save(tmp_path / "s1")
    SAE(32, 16, hook_name=HOOK, model_name="m2").save(tmp_path / "s2")
    assert cli.main(["perturb"]) == 2
    assert cli.main(["perturb", str(tmp_path / "s1"), str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert "error: nothing to perturb" in err and "different models: s1 from m1, s2 from m2" in err
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(f"w{(i * d) % 60 + 2}" for i in range(200))}) + "\n"
                            for d in range(1, 41)))
    out = tmp_path / "run"
    argv = ["perturb", str(tmp_path / "s1"), "--hooks", "layers:1", "--model", str(tiny_hf_model_dirs["gpt2"]),
            "--source", str(text), "--context-length", "12", "--eval-contexts", "4", "--cos", "0.5", "0.9",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| blocks.1.hook_resid_post | - | activation |" in printed
    assert "| blocks.0.hook_resid_post | s1 | SAE output |" in printed
    assert json.loads((out / "perturb.json").read_text())["sae_paths"] == {"s1": str(tmp_path / "s1")}
