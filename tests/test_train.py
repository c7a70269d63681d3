import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from saelab.data.toy import ToyDataSource
from saelab.errors import ConfigError, DataError
from saelab.evals.reconstruction import evaluate_saes
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.shard import Shard, interleave
from saelab.train.spec import TrainSpec

TOY = dict(d=16, n_features=48, mean_active=3, batch_size=256, seed=3)


def mixed_specs():
    specs = [
        TrainSpec(arch="relu", d_sae=48, coefficient=0.1, warmup_steps=5),
        TrainSpec(arch="relu", d_sae=48, coefficient=0.1, decoder_norm="unit", name="relu_unit", resample_every=7, dead_tokens=512),
        TrainSpec(arch="topk", d_sae=48, k=3, warmup_steps=5, dead_tokens=512),
        TrainSpec(arch="batchtopk", d_sae=48, k=3, init="data"),
        TrainSpec(arch="jumprelu", d_sae=48, coefficient=0.01, b_dec_init="geometric_median"),
    ]
    for spec in specs:
        spec.lr, spec.warmup_steps = 5e-3, 5
    return specs


def weights(run_dir):
    return {p.name: SAE.load(p).state_dict() for p in sorted((run_dir / "saes").iterdir())}


def test_group_training_writes_everything(tmp_path):
    src = ToyDataSource(**TOY)
    trainer = GroupTrainer(mixed_specs(), 16, tmp_path, TrainConfig(total_steps=40, checkpoint_every=15, log_every=5))
    eval_batches = [src.batch(10_000 + i) for i in range(2)]
    result = trainer.fit(src)
    assert [t.label for t in result.trained] == trainer.labels and result.writes
    assert all((t.path / "cfg.json").exists() and t.path == tmp_path / "saes" / t.label for t in result.trained)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    first, last = log[0]["saes"], log[-1]["saes"]
    for name in first:
        assert set(first[name]) >= {"loss", "mse", "sparsity", "aux", "l0", "fvu", "dead", "lr"}
        assert last[name]["fvu"] < first[name]["fvu"]  # it learns
    metrics = dict(zip(trainer.labels, evaluate_saes(result.saes, eval_batches)))
    assert all(0 <= m.fvu < 1 and m.n_tokens == 512 for m in metrics.values())
    assert metrics["topk_48_k3"].l0 <= 3 + 1e-6
    # the returned SAEs are the saved ones, label and spec recorded
    for t in result.trained:
        saved = SAE.load(t.path)
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in t.sae.state_dict().items())
        assert saved.cfg.metadata["label"] == t.label and saved.cfg.metadata["train"] == t.spec.to_dict()


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL mid-way and resumed ends with bitwise the same weights."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    cfg = TrainConfig(total_steps=30, checkpoint_every=10, log_every=3, normalize_activations=True, seed=5)
    src = ToyDataSource(**TOY)
    GroupTrainer(mixed_specs(), 16, full, cfg).fit(src)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from saelab.data.toy import ToyDataSource
        from saelab.train import GroupTrainer, TrainConfig
        from tests.test_train import mixed_specs, TOY
        def crash(step, entries):
            if step == 17:
                os.kill(os.getpid(), signal.SIGKILL)
        cfg = TrainConfig(total_steps=30, checkpoint_every=10, log_every=3, normalize_activations=True, seed=5)
        GroupTrainer(mixed_specs(), 16, {str(crashed)!r}, cfg, on_step=crash).fit(ToyDataSource(**TOY))
        """
    )
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    assert not (crashed / "saes").exists()
    GroupTrainer(mixed_specs(), 16, crashed, cfg).fit(src)
    a, b = weights(full), weights(crashed)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    steps = [json.loads(line)["step"] for line in (crashed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(3, 31, 3))


def test_normalized_training_gives_saes_for_raw_activations(tmp_path):
    src = ToyDataSource(**TOY)
    scaled = lambda: (b * 50.0 for b in src.iter_from(0))  # noqa: E731 - raw activations with a large norm
    trainer = GroupTrainer(
        [TrainSpec(arch="topk", d_sae=48, k=3, lr=5e-3)], 16, tmp_path, TrainConfig(total_steps=60, normalize_activations=True)
    )
    raw = src.batch(999) * 50.0
    result = trainer.fit(scaled())
    s = trainer.scale_in
    assert s == pytest.approx(4.0 / float((src.batch(0) * 50).norm(dim=-1).mean()), rel=1e-5)
    saved = SAE.load(tmp_path / "saes" / trainer.labels[0])
    with torch.no_grad():
        torch.testing.assert_close(saved(raw), trainer.saes[0].eval()(raw * s) / s, rtol=1e-4, atol=1e-3)
    assert evaluate_saes(result.saes, [raw])[0].fvu < 0.5  # the final SAE reconstructs raw (unscaled) inputs


def test_resampling_reinitialises_only_dead_features(tmp_path):
    spec = TrainSpec(arch="relu", d_sae=32, coefficient=0.1, resample_every=1, dead_tokens=1)
    trainer = GroupTrainer([spec], 16, tmp_path, TrainConfig(total_steps=1))
    t = trainer.trainers[0]
    before = t.sae.W_dec.detach().clone()
    t.since_fired[:10] = 5  # features 0..9 dead, the rest alive
    x = torch.randn(64, 16)
    n = t.resample(x, x)
    assert n == 10
    assert torch.equal(t.sae.W_dec[10:], before[10:])
    assert not torch.allclose(t.sae.W_dec[:10], before[:10])
    assert (t.sae.b_enc[:10] == 0).all() and (t.since_fired[:10] == 0).all()
    # each new decoder direction is one of the batch's centred inputs
    cos = torch.nn.functional.normalize(t.sae.W_dec[:10], dim=1) @ torch.nn.functional.normalize(x - t.sae.b_dec, dim=1).T
    assert (cos.max(1).values > 0.9999).all()


def test_transcoder_learns_a_sparse_map(tmp_path):
    torch.manual_seed(0)
    src = ToyDataSource(**TOY)
    readout = torch.randn(48, 8)
    pairs = lambda: ((src.batch(i), src.batch_and_acts(i)[1] @ readout) for i in range(10_000))  # noqa: E731
    trainer = GroupTrainer(
        [TrainSpec(arch="topk", d_sae=96, k=4, lr=3e-3, warmup_steps=10)], 16, tmp_path, TrainConfig(total_steps=150), d_out=8
    )
    result = trainer.fit(pairs())
    [metrics] = evaluate_saes(result.saes, [(src.batch(50_000), src.batch_and_acts(50_000)[1] @ readout)])
    assert metrics.fvu < 0.6
    assert SAE.load(tmp_path / "saes" / trainer.labels[0]).cfg.d_out == 8


def test_bad_batches_and_configs(tmp_path):
    spec = [TrainSpec(arch="relu", d_sae=8)]
    with pytest.raises(DataError, match="NaN"):
        GroupTrainer(spec, 4, tmp_path / "a", TrainConfig(total_steps=3)).fit([torch.ones(8, 4), torch.full((8, 4), float("nan"))] * 2)
    with pytest.raises(DataError, match="expect"):
        GroupTrainer(spec, 4, tmp_path / "b", TrainConfig(total_steps=3)).fit([torch.ones(8, 5)] * 3)
    with pytest.raises(DataError, match="ran out"):
        GroupTrainer(spec, 4, tmp_path / "c", TrainConfig(total_steps=5)).fit([torch.ones(8, 4)] * 2)
    with pytest.raises(ConfigError, match="label"):
        GroupTrainer(spec * 2, 4, tmp_path / "d")
    GroupTrainer(spec, 4, tmp_path / "e", TrainConfig(total_steps=2)).fit([torch.randn(8, 4)] * 2)
    with pytest.raises(ConfigError, match="different run"):
        GroupTrainer([TrainSpec(arch="relu", d_sae=16)], 4, tmp_path / "e", TrainConfig(total_steps=2)).fit([torch.randn(8, 4)] * 2)
    with pytest.raises(ConfigError, match="init"):
        TrainSpec(init="random")


def test_config_json_records_the_pipeline_and_resume_checks_it(tmp_path):
    spec, batches = [TrainSpec(arch="relu", d_sae=8)], [torch.randn(8, 4)] * 2
    make = lambda pipeline: GroupTrainer(spec, 4, tmp_path, TrainConfig(total_steps=2), pipeline=pipeline)  # noqa: E731
    make({"source": "stdlib", "eval_contexts": 8}).fit(batches)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pipeline"] == {"source": "stdlib", "eval_contexts": 8} and config["specs"] == [spec[0].to_dict()]
    make({"source": "stdlib", "eval_contexts": 8}).fit(batches)  # the same run resumes (here: is complete)
    with pytest.raises(ConfigError, match="different run"):
        make({"source": "stdlib", "eval_contexts": 16}).fit(batches)


def test_shard_takes_every_world_th_and_gathers_in_spec_order():
    shards = [Shard(7, rank, 3) for rank in range(3)]
    assert [list(s.indices) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    labels = [f"sae{i}" for i in range(7)]
    parts = [s.take(labels) for s in shards]
    assert interleave(parts, 7) == labels and [s.writes for s in shards] == [True, False, False]
    assert Shard(2).gather(["a", "b"]) == ["a", "b"]  # one process: its own list
    with pytest.raises(ConfigError, match="values for 7 SAEs"):
        interleave([["a"], ["b"]], 7)
    with pytest.raises(ConfigError, match="every rank needs at least one"):
        Shard(2, 0, 3)


def test_schedules():
    spec = TrainSpec(lr=1.0, warmup_steps=10, decay_fraction=0.5, coefficient=2.0, coefficient_warmup_steps=4)
    assert spec.lr_at(0, 100) == pytest.approx(0.1)
    assert spec.lr_at(20, 100) == 1.0
    assert spec.lr_at(75, 100) == pytest.approx(0.5)
    assert spec.coefficient_at(1) == pytest.approx(1.0) and spec.coefficient_at(10) == 2.0


def test_non_finite_loss_stops_training_naming_the_step_sae_and_last_checkpoint(tmp_path):
    """Finite batches whose squares overflow float32 from the 7th step on: the run stops there,
    with no log line, checkpoint or SAE written past the last good checkpoint (step 4)."""
    from safetensors import safe_open

    specs = [TrainSpec(arch="topk", d_sae=8, k=2), TrainSpec(arch="relu", d_sae=8, name="tiny")]
    batches = [torch.randn(16, 4) for _ in range(6)] + [torch.randn(16, 4) * 1e25 for _ in range(4)]
    cfg = TrainConfig(total_steps=10, checkpoint_every=4, log_every=1)
    with pytest.raises(DataError, match=r"SAE topk_8_k2 \(topk, width 8, lr [^)]*\) had a NaN or Inf loss at step 7 "
                                        r"\(1 other SAE\(s\) too\).*last good checkpoint.*checkpoint.safetensors \(step 4\)"):
        GroupTrainer(specs, 4, tmp_path, cfg).fit(batches)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as fh:
        assert fh.metadata()["step"] == "4"
        assert all(bool(torch.isfinite(fh.get_tensor(k)).all()) for k in fh.keys() if "rng" not in k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)) and not (tmp_path / "saes").exists()
    with pytest.raises(DataError, match="at step 2; .*: none yet"):  # diverging before any checkpoint
        GroupTrainer(specs[:1], 4, tmp_path / "b", cfg).fit([batches[0]] + batches[6:] * 3)


def test_the_cli_shows_a_diverged_run_as_one_line(tmp_path, capsys):
    from saelab import cli

    code = cli.main(["toy", "--steps", "6", "--lr", "1e30", "--init", "tied", "--curve-every", "1",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    found = re.fullmatch(r"error: training stopped: SAE \S+ \(.*\) had a NaN or Inf loss at step (\d+).*", err[-1])
    assert code == 2 and found
    assert not (tmp_path / "run" / "saes").exists()
    # the recovery curve, measured every step, holds only the steps before the divergence
    points = json.loads((tmp_path / "run" / "recovery_curve.json").read_text())["points"]
    assert [p["step"] for p in points] == list(range(int(found.group(1))))
