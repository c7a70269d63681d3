"""End to end on the tiny LM: cache -> train a small sweep -> evaluate -> prune."""

import json

import pytest
import torch

from saelab.cli import main
from saelab.evals.entry import read_metrics
from saelab.evals.metrics import fvu
from saelab.evals.reconstruction import evaluate_saes, lm_batches
from saelab.data.outliers import OutlierRule
from saelab.data.provenance import Provenance
from saelab.pipelines.train_lm import TABLE_COLUMNS, LMSweepConfig, run_lm_sweep
from saelab.sae import SAE
from saelab.train.sweep import SweepGrid, sweep_specs


def test_lm_reconstruction_metrics_match_direct_computation(tiny_lm):
    """evaluate_saes over lm_batches: an SAE and a transcoder on other hooks, one LM pass."""
    hook, mlp_in, mlp_out = "blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    sae = SAE(tiny_lm.hook_dim(hook), 64, hook_name=hook)
    tc = SAE(32, 64, d_out=32, hook_name=mlp_in, hook_name_out=mlp_out)
    tokens = torch.randint(3, 500, (6, 16))
    got = evaluate_saes([sae, tc], lm_batches(tiny_lm, [sae, tc], tokens, batch_size=4))
    cache = tiny_lm.run_with_cache(tokens, [hook, mlp_in, mlp_out])
    rows = {h: a[:, 1:].reshape(-1, 32) for h, a in cache.items()}
    with torch.no_grad():
        assert got[0].fvu == pytest.approx(fvu(rows[hook], sae(rows[hook])), rel=1e-4)
        assert got[1].fvu == pytest.approx(fvu(rows[mlp_out], tc(rows[mlp_in])), rel=1e-4)
    assert got[0].n_tokens == got[1].n_tokens == 6 * 15
    with_bos = evaluate_saes([sae], lm_batches(tiny_lm, [sae], tokens, exclude_bos=False))
    assert with_bos[0].n_tokens == 6 * 16


@pytest.mark.slow
def test_sweep_end_to_end_and_prune(tiny_lm, tiny_lm_path, tmp_path, capsys):
    specs = sweep_specs(SweepGrid(expansion=[4], coefficient=[1.0], k=[8]), steps=60, lr=3e-3)
    cfg = LMSweepConfig(specs=specs, model=str(tiny_lm_path), context_length=32, train_contexts=256,
                        eval_contexts=16, batch_size=512, steps=60)
    entries = run_lm_sweep(cfg, tmp_path / "run", lm=tiny_lm)
    assert [e.name for e in entries] == ["relu_128_c1", "topk_128_k8"]
    for e in entries:
        assert 0 < e.recon.fvu < 1 and 0.0 < e.downstream.loss_recovered <= 1.05 and e.downstream.kl >= 0
    topk = entries[1]
    assert topk.recon.l0 <= 8 + 1e-6 and topk.spec == cfg.specs[1].to_dict()
    for name in ("metrics.json", "log.jsonl", "l0_vs_loss_recovered.png", "feature_density.png", "config.json", "table.txt"):
        assert (tmp_path / "run" / name).exists(), name
    assert not (tmp_path / "run" / "sweep.json").exists()  # one config file: config.json
    assert [r.to_dict() for r in read_metrics(tmp_path / "run")] == [e.to_dict() for e in entries]
    # the saved SAE evaluates the same when loaded again
    sae = SAE.load(tmp_path / "run" / "saes" / "topk_128_k8")
    assert sae.cfg.model_name == str(tiny_lm_path) and sae.cfg.hook_name == "blocks.0.hook_resid_post"
    # it records the text it was trained on (saelab's provenance and SAELens's keys) and the outlier rule,
    # which flags nothing on this model: the table keeps its columns
    assert Provenance.of(sae) == Provenance("stdlib", 32, True, True, OutlierRule(10))
    cfg_json = json.loads((tmp_path / "run" / "saes" / "topk_128_k8" / "cfg.json").read_text())
    assert (cfg_json["dataset_path"], cfg_json["context_size"]) == ("stdlib", 32)
    assert all(e.recon.outliers.n_outliers == 0 and e.downstream.outliers_kept == 0 for e in entries)
    assert all(e["train_outliers"] == 0 and e["train_tokens"] == 60 * 512 for e in entries)
    table = (tmp_path / "run" / "table.txt").read_text().splitlines()
    assert table[0].split() == [c if isinstance(c, str) else c.title for c in TABLE_COLUMNS]
    recovered = table[2].split()[TABLE_COLUMNS.index(TABLE_COLUMNS[-2])]  # loss recovered: a percent, as plotted
    assert recovered == f"{100 * entries[0]['loss_recovered']:.1f}%"
    # prune it to half its L0 and re-measure through the CLI
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "run" / "saes" / "relu_128_c1"), "--target-l0", str(entries[0].recon.l0 / 2),
                 "--eval-contexts", "16", "--out", str(out), "--compare", str(tmp_path / "run")]) == 0
    pruned = json.loads((out / "metrics.json").read_text())
    assert pruned[0]["name"] == "original" and pruned[1]["l0"] < entries[0].recon.l0 / 2
    assert pruned[1]["n_killed"] > 0 and (out / "l0_vs_loss_recovered.png").exists()
    assert "pruned_l0<" in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_command_prints_table_best_and_report(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--model", str(tiny_lm_path), "--out", str(out), "--steps", "20", "--train-contexts", "64",
            "--context-length", "32", "--eval-contexts", "8", "--batch-tokens", "256", "--expansion", "2",
            "--l1", "1", "--k", "4", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    entries = json.loads((out / "metrics.json").read_text())
    best = max(entries, key=lambda e: e["loss_recovered"])
    assert [e["name"] for e in entries] == ["relu_64_c1", "topk_64_k4"]
    assert f"best loss recovered: {best['name']} {100 * best['loss_recovered']:.1f}%" in text
    assert f"report: {out / 'metrics.json'}" in text and (out / "l0_vs_loss_recovered.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"]["device"] == "cpu" and config["pipeline"]["eval_contexts"] == 8
    assert config["train"]["total_steps"] == 20 and config["model_name"] == str(tiny_lm_path)
    # the same command again resumes the finished run (the config check passes) and evaluates alike
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "timings"} for r in rows]  # noqa: E731
    assert strip(again) == strip(entries) and set(again[0]["timings"]) == {"cache_s", "train_s", "eval_s"}


def test_rank_device(monkeypatch):
    from saelab.pipelines.train_lm import rank_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device("cuda") == "cuda" and rank_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == "cuda:1" and rank_device("cuda:0") == "cuda:0" and rank_device("cpu") == "cpu"


@pytest.mark.slow
def test_live_sweep_needs_no_cache_and_trains_alike(tiny_lm, tiny_lm_path, tmp_path):
    """--live: the same batches as the cache gives (tests/test_cache.py checks them equal), so
    the same SAEs up to float noise of different LM batch sizes, and nothing on disk."""
    specs = sweep_specs(SweepGrid(arch=["topk"], expansion=[2], k=[4]), steps=30, lr=3e-3)
    common = dict(specs=specs, model=str(tiny_lm_path), context_length=16, train_contexts=96, eval_contexts=8,
                  batch_size=128, steps=30)
    cached = run_lm_sweep(LMSweepConfig(**common), tmp_path / "cached", lm=tiny_lm)
    live = run_lm_sweep(LMSweepConfig(**common, live=True), tmp_path / "live", lm=tiny_lm)
    assert (tmp_path / "cached" / "cache").is_dir() and not (tmp_path / "live" / "cache").exists()
    for a, b in zip(cached, live):
        assert b.recon.fvu == pytest.approx(a.recon.fvu, rel=1e-3) and b.recon.l0 == pytest.approx(a.recon.l0, rel=1e-3)
    assert "data_s" in live[0]["timings"] and "cache_s" in cached[0]["timings"]
