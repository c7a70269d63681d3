"""Massive activations: the outlier rule, and where it applies (training batches, reconstruction
metrics, the loss-recovered splice, the feature scan), each checked against a direct
computation. The real model's outliers are checked in tests/test_real_lm.py."""

import json

import pytest
import torch
import torch.nn.functional as F

from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule, OutlierTally
from saelab.data.toy import ToyDataSource
from saelab.errors import ConfigError
from saelab.evals.downstream import KeepFlagged, SameAs, compare_splices, evaluate_downstream, sae_splices
from saelab.evals.entry import MetricsEntry, recovered_column, with_outlier_columns
from saelab.evals.metrics import fvu, l0, mse
from saelab.evals.reconstruction import PerSAE, RowsAt, evaluate_on_lm, evaluate_saes
from saelab.interpret.scan import scan_features
from saelab.interpret.sources import ContextBatch
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.spec import TrainSpec

HOOK = "blocks.0.hook_resid_post"


# ---- the rule ------------------------------------------------------------------------------
def rows_with_norms(norms) -> torch.Tensor:
    """Rows (N, 4) with exactly these norms (along a fixed direction)."""
    return torch.tensor(norms, dtype=torch.float32)[:, None] * torch.tensor([0.5, 0.5, 0.5, 0.5])


def test_mask_flags_rows_above_the_multiple_of_the_median():
    x = rows_with_norms([1, 2, 3, 4, 5, 40, 41, 3.0])  # median (lower) 3: threshold 30 at 10x
    assert OutlierRule(10).mask(x).tolist() == [False] * 5 + [True, True, False]
    assert OutlierRule(13.5).mask(x).tolist() == [False] * 5 + [False, True, False]  # 40 < 40.5 < 41
    tie = rows_with_norms([1, 1, 1, 10, 10.0001])  # exactly 10x the median is not above it
    assert OutlierRule(10).mask(tie).tolist() == [False, False, False, False, True]
    assert not OutlierRule(10).mask(rows_with_norms([7.0] * 6)).any()  # all equal
    assert OutlierRule(10).mask(torch.zeros(0, 4)).shape == (0,)  # no rows
    assert not OutlierRule(10).mask(rows_with_norms([0, 0, 0, 5.0])).any()  # median 0: no scale
    assert not OutlierRule(None).mask(x).any() and not OutlierRule(0).enabled
    assert OutlierRule().multiple == DEFAULT_MULTIPLE == 10.0


def test_position_mask_judges_rows_from_start_together():
    act = torch.ones(2, 4, 3)
    act[0, 0] *= 1000  # position 0 (BOS) is left out with start=1, and never flagged there
    act[1, 2] *= 1000
    assert OutlierRule().position_mask(act, start=1).tolist() == [[False] * 4, [False, False, True, False]]
    assert OutlierRule().position_mask(act).tolist() == [[True, False, False, False], [False, False, True, False]]


@pytest.mark.parametrize("bad", [-3, 0.5, 1, float("nan"), float("inf"), "10", True])
def test_bad_multiples_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="outlier multiple must be"):
        OutlierRule(bad)


def test_parse_reads_numbers_and_off():
    assert OutlierRule.parse("25").multiple == 25.0
    assert [OutlierRule.parse(t).multiple for t in ("none", "0", "off", "None")] == [None] * 4
    with pytest.raises(ConfigError, match="must be a number"):
        OutlierRule.parse("lots")
    assert OutlierRule.from_dict(OutlierRule(12).to_dict()) == OutlierRule(12)


def test_tally_counts_positions_and_tokens():
    t = OutlierTally()
    t.update(torch.tensor([True, False, True, True]), torch.tensor([0, 1, 0, 5]), torch.tensor([9, 2, 9, 4]))
    t.update(torch.tensor([False, False]))
    assert (t.n_rows, t.n_flagged, t.share) == (6, 3, 0.5)
    assert t.top_positions() == [[0, 2], [5, 1]] and t.top_tokens() == [[9, 2], [4, 1]]


# ---- reconstruction metrics ------------------------------------------------------------------
@pytest.fixture
def planted():
    """40 rows of 8 dims with rows 3 and 17 at ~50x the others; an SAE; where the rows sat."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    x[[3, 17]] *= 50
    sae = SAE(8, 16, hook_name=HOOK)
    at = RowsAt(torch.arange(40) % 10 + 1, torch.arange(40) % 7)
    return x, sae, at


def test_metrics_leave_flagged_rows_out_and_report_them(planted):
    x, sae, at = planted
    [m] = evaluate_saes([sae], [PerSAE([x], at)], outliers=OutlierRule(), token_text=lambda i: f"t{i}")
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 17]] = False
    with torch.no_grad():
        x_hat, f = sae(x), sae.encode(x)
    assert m.n_tokens == 38
    assert m.mse == pytest.approx(mse(x[keep], x_hat[keep]), rel=1e-6)
    assert m.fvu == pytest.approx(fvu(x[keep], x_hat[keep]), rel=1e-6)
    assert m.l0 == pytest.approx(l0(f[keep]))
    r = m.outliers
    assert (r.multiple, r.n_outliers, r.share) == (10.0, 2, 0.05)
    assert r.mse_all == pytest.approx(mse(x, x_hat), rel=1e-6) and r.fvu_all == pytest.approx(fvu(x, x_hat), rel=1e-6)
    assert r.fvu_all != pytest.approx(m.fvu, rel=1e-3)
    assert r.positions == [[4, 1], [8, 1]] and r.tokens == [["t3", 2]]  # rows 3 and 17: positions 4, 8; token 3
    [plain] = evaluate_saes([sae], [PerSAE([x], at)])
    assert plain.n_tokens == 40 and plain.outliers is None and plain.mse == pytest.approx(r.mse_all, rel=1e-6)
    [off] = evaluate_saes([sae], [x], outliers=OutlierRule(None))
    assert off.outliers.n_outliers == 0 and off.fvu == off.outliers.fvu_all == pytest.approx(plain.fvu)


def test_the_report_round_trips_through_metrics_json(planted):
    x, sae, at = planted
    [m] = evaluate_saes([sae], [PerSAE([x], at)], outliers=OutlierRule())
    row = MetricsEntry("a", m)
    back = MetricsEntry.from_dict(json.loads(json.dumps(row.to_dict())))
    assert back.to_dict() == row.to_dict() and back.recon.outliers == m.outliers and back.extra == []
    assert row["outliers"] == 2 and row["fvu_all"] == m.outliers.fvu_all
    assert with_outlier_columns(("name",), [row]) == ("name", "outliers", "fvu_all", recovered_column("loss_recovered_all"))
    clean = MetricsEntry("b", evaluate_saes([sae], [x[:3]], outliers=OutlierRule())[0])
    assert with_outlier_columns(("name",), [clean]) == ("name",)  # no outliers: the table as it was


# ---- the splice ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_hf_model_dirs):
    return HookedLM.load(tiny_hf_model_dirs["llama"])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))


def hf_ce(lm, tokens, fn, start=1):
    """Mean next-token CE (positions from `start`) of the HF model with block 0's output
    replaced by fn(output), by a plain torch forward hook."""
    handle = lm.blocks[0].register_forward_hook(lambda _m, _a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple)
                                                else fn(out))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=tokens, use_cache=False).logits
    finally:
        handle.remove()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1)[:, start:].mean().item()


def test_splice_keeps_clean_activations_exactly_at_flagged_positions(llama, tokens):
    torch.manual_seed(1)
    sae = SAE(llama.d_model, 64, hook_name=HOOK)
    rule = OutlierRule(1.05)  # the tiny model has no massive activations: a low multiple flags some rows
    clean = llama.run_with_cache(tokens, [HOOK])[HOOK]
    flagged = rule.position_mask(clean, start=1)
    assert 0 < int(flagged.sum()) < flagged[:, 1:].numel() // 2
    keep = KeepFlagged(rule, start=1)
    with torch.no_grad():
        out, plain = sae_splices(llama, sae, keep=keep)[HOOK](clean), sae(clean)
    assert torch.equal(out[flagged], clean[flagged]) and torch.equal(out[~flagged], plain[~flagged])
    assert keep.total == int(flagged.sum())
    # through the whole model, one batch (so the rule sees the same rows): against plain torch hooks
    [entry] = evaluate_downstream(llama, [sae], tokens, batch_size=6, exclude_bos=True, outliers=rule)

    def spliced(act, keep_flagged):
        new = sae(act)
        new[:, 0] = act[:, 0]
        return torch.where(rule.position_mask(act, 1).unsqueeze(-1), act, new) if keep_flagged else new
    assert entry.ce_sae == pytest.approx(hf_ce(llama, tokens, lambda a: spliced(a, True)), abs=1e-5)
    assert entry.all_positions.ce == pytest.approx(hf_ce(llama, tokens, lambda a: spliced(a, False)), abs=1e-5)
    assert entry.outliers_kept == int(flagged.sum()) and entry.all_positions.ce != entry.ce_sae
    d = entry.to_dict()
    assert d["ce_sae_all"] == entry.all_positions.ce and d["loss_recovered_all"] != d["loss_recovered"]
    assert {"kl_all", "ce_delta_all", "loss_recovered_mean_all"} <= set(d)


def test_without_flags_the_all_positions_splice_is_the_same_and_costs_no_pass(llama, tokens, monkeypatch):
    sae = SAE(llama.d_model, 64, hook_name=HOOK)
    [entry] = evaluate_downstream(llama, [sae], tokens, batch_size=4, exclude_bos=True)  # default rule: no flags
    assert entry.outliers_kept == 0 and entry.all_positions.ce == entry.ce_sae and entry.all_positions.kl == entry.kl
    [off] = evaluate_downstream(llama, [sae], tokens, batch_size=4, exclude_bos=True, outliers=OutlierRule(None))
    assert off.outliers_kept is None and off.all_positions is None and off.ce_sae == entry.ce_sae
    calls = []
    run = llama.run_with_cache  # every pass of compare_splices goes through it
    monkeypatch.setattr(llama, "run_with_cache", lambda *a, **k: calls.append(1) or run(*a, **k))
    variants = {"a": {HOOK: lambda act: act * 0.5}, "b": {HOOK: lambda act: act * 0.5}}
    res = compare_splices(llama, tokens, variants, batch_size=3, same_as={"b": SameAs("a", lambda: True)})
    assert len(calls) == 2 * 2 and res["b"] == res["a"]  # two batches: clean and "a" only
    with pytest.raises(ConfigError, match="earlier variant"):
        compare_splices(llama, tokens, variants, same_as={"a": SameAs("b", lambda: True)})


def test_evaluate_on_lm_reports_outliers_per_sae(llama, tokens):
    sae = SAE(llama.d_model, 64, hook_name=HOOK)
    [ev] = evaluate_on_lm(llama, [sae], tokens, batch_size=6, outliers=OutlierRule(1.05))
    assert ev.recon.outliers.n_outliers == ev.downstream.outliers_kept > 0
    assert ev.recon.n_tokens + ev.recon.outliers.n_outliers == 6 * 11
    assert all(1 <= p <= 11 for p, _ in ev.recon.outliers.positions)
    assert all(isinstance(t, str) for t, _ in ev.recon.outliers.tokens)


# ---- training --------------------------------------------------------------------------------
class Planted:
    """Toy batches with every 50th row replaced by a row 1000x the largest, resumable like the
    real sources; with `pairs`, (x, 2x) batches."""

    def __init__(self, pairs: bool = False):
        self.src, self.pairs = ToyDataSource(d=16, n_features=48, mean_active=3, batch_size=200, seed=3), pairs

    def iter_from(self, step):
        for x in self.src.iter_from(step):
            x = x.clone()
            x[::50] = 1000.0 * x.abs().max()
            yield (x, 2 * x) if self.pairs else x


@pytest.mark.parametrize("pairs", [False, True])
def test_training_batches_never_hold_a_flagged_row(tmp_path, pairs):
    spec = TrainSpec(arch="topk", d_sae=32, k=3, lr=5e-3, warmup_steps=2, init="data")
    cfg = TrainConfig(total_steps=6, log_every=3, normalize_activations=True, outlier_multiple=10)
    trainer = GroupTrainer([spec], 16, tmp_path, cfg, d_out=16)
    seen = []
    update = trainer.trainers[0].update
    trainer.trainers[0].update = lambda step, x, y, log=True: seen.append((x.clone(), y.clone())) or update(step, x, y, log)
    result = trainer.fit(Planted(pairs))
    first = next(Planted().iter_from(0))
    clean = first[torch.arange(200) % 50 != 0]
    assert trainer.scale_in == pytest.approx(4.0 / clean.norm(dim=-1).mean().item())  # sqrt(16) / mean clean norm
    for x, y in seen:
        assert x.shape[0] == 196 and (x / trainer.scale_in).abs().max() < 100
        if pairs:  # y = 2x scaled by half x's scale: the same rows, still aligned after the drop
            assert trainer.scale_out == pytest.approx(trainer.scale_in / 2) and torch.allclose(y, x, rtol=1e-5)
        else:
            assert torch.equal(y, x)
    assert (result.rows_trained, result.rows_dropped) == (6 * 196, 6 * 4)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["tokens"], r["outliers_dropped"]) for r in log] == [(3 * 196, 12), (6 * 196, 24)]
    assert result.trained[0].sae.cfg.metadata["provenance"]["outliers"] == {"multiple": 10.0}


def test_training_with_outliers_resumes_exactly(tmp_path):
    spec = TrainSpec(arch="relu", d_sae=32, coefficient=0.1, lr=5e-3, warmup_steps=2)
    cfg = TrainConfig(total_steps=8, checkpoint_every=4, log_every=2, normalize_activations=True, outlier_multiple=10)

    def stop(step, entries):
        if step == 6:
            raise KeyboardInterrupt

    GroupTrainer([spec], 16, tmp_path / "full", cfg).fit(Planted())
    with pytest.raises(KeyboardInterrupt):
        GroupTrainer([spec], 16, tmp_path / "cut", cfg, on_step=stop).fit(Planted())
    resumed = GroupTrainer([spec], 16, tmp_path / "cut", cfg).fit(Planted())
    full = SAE.load(tmp_path / "full" / "saes" / resumed.trained[0].label)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in resumed.trained[0].sae.state_dict().items())
    assert (resumed.rows_trained, resumed.rows_dropped) == (8 * 196, 8 * 4)
    assert (tmp_path / "full" / "log.jsonl").read_text() == (tmp_path / "cut" / "log.jsonl").read_text()


# ---- the feature scan ------------------------------------------------------------------------
def test_scan_skips_flagged_rows():
    torch.manual_seed(0)
    sae = SAE(8, 16, hook_name=HOOK)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    acts = torch.randn(2, 6, 8)
    acts[1, 4] *= 200  # would be every active feature's top example
    tokens = torch.randint(0, 20, (2, 6))
    tokens[1, 4] = 7
    batch = ContextBatch(tokens, torch.arange(2), acts)
    everything = scan_features([batch], sae, vocab_size=20)
    skipped = scan_features([batch], sae, vocab_size=20, outliers=OutlierRule())
    assert everything.n_tokens == 12 and skipped.n_tokens == 11
    assert skipped.outliers.n_flagged == 1 and skipped.outliers.top_positions() == [[4, 1]]
    assert skipped.outliers.top_tokens() == [[7, 1]]
    top = lambda scan: {(r, p) for j in range(16) for _, r, p in scan.top_examples(j)}  # noqa: E731
    assert (1, 4) in top(everything) and (1, 4) not in top(skipped)
    assert skipped.count.sum() < everything.count.sum()


# ---- the option --------------------------------------------------------------------------------
def test_outlier_multiple_option_and_config(capsys, tmp_path):
    from saelab.cli import main
    from saelab.pipelines.train_lm import LMSweepConfig

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--outlier-multiple", "-1", "--print-config"])
    assert exit_.value.code == 2 and "the outlier multiple must be > 1" in capsys.readouterr().err
    for typed, want in ((["--outlier-multiple", "0"], None), (["--outlier-multiple", "25"], 25.0), ([], 10.0)):
        assert main(["train", *typed, "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["outlier_multiple"] == want
    (tmp_path / "run.json").write_text(json.dumps({"outlier_multiple": None}))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["outlier_multiple"] is None
    with pytest.raises(ConfigError, match="outlier multiple"):
        LMSweepConfig(specs=[], outlier_multiple=-2)
    with pytest.raises(ConfigError, match="outlier multiple"):
        TrainConfig(outlier_multiple=0.9)
