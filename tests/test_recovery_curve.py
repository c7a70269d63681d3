"""Recovery during training (seed 001's data-sample init): the curve starts at the initial SAEs
and ends at the final ones; data-sample init starts higher than tied init on toy data."""

import json

import torch

from saelab.cli import main
from saelab.data.toy import ToyDataConfig, ToyDataSource
from saelab.pipelines.recovery_curve import CURVE_FILE, RecoveryCurve, curve_series, format_curve_summary
from saelab.pipelines.toy import Recovery, ToySweepConfig, ground_truth_recovery, run_toy_sweep
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig

DATA = ToyDataConfig(d=16, n_features=32, mean_active=3, batch_size=256)


def _sweep(**kw) -> ToySweepConfig:
    return ToySweepConfig(data=DATA, width=32, arch=["relu"], coefficient=[0.3], steps=120, **kw)


def test_default_toy_specs_are_unchanged_by_the_init_option():
    specs = ToySweepConfig().specs()
    assert [s.init for s in specs] == ["tied"] * 4 and all(s.name is None for s in specs)
    both = _sweep(init=["data", "tied"]).specs()
    assert [(s.init, s.name) for s in both] == [("data", "relu_32_c0.3_data"), ("tied", "relu_32_c0.3_tied")]


def test_the_curve_starts_at_the_initial_saes_and_ends_at_the_final_ones(tmp_path):
    cfg = _sweep(init=["data", "tied"], curve_every=50)
    rows = run_toy_sweep(cfg, tmp_path)
    curve = json.loads((tmp_path / CURVE_FILE).read_text())
    assert [p["step"] for p in curve["points"]] == [0, 50, 100, 120]
    truth = ToyDataSource(DATA).features
    torch.manual_seed(0)  # GroupTrainer's initialisation: tied decoders are the SAEs as built
    tied = [SAE.from_config(s.sae_config(DATA.d)) for s in cfg.specs()][1]
    assert curve["points"][0]["saes"]["relu_32_c0.3_tied"] == ground_truth_recovery(tied, truth).to_dict()
    for row in rows:
        final = SAE.load(tmp_path / "saes" / row.name)
        assert curve["points"][-1]["saes"][row.name] == ground_truth_recovery(final, truth).to_dict()
    assert (tmp_path / "recovery_curve.png").stat().st_size > 0


def test_data_init_starts_higher_than_tied_init(tmp_path):
    """Measured at d=16, 32 true features, step 0: 0.66 (data) against 0.50 (tied); the gap was
    0.15-0.24 over data seeds 0-2, hence the 0.1 margin."""
    run_toy_sweep(_sweep(init=["data", "tied"], curve_every=60), tmp_path)
    series = curve_series(json.loads((tmp_path / CURVE_FILE).read_text()))
    assert series["relu_32_c0.3_data"][0][1] > series["relu_32_c0.3_tied"][0][1] + 0.1


def test_a_resumed_run_keeps_the_points_up_to_its_checkpoint_and_measures_on(tmp_path):
    cfg = _sweep(init=["data"], curve_every=40)
    trainer = GroupTrainer(cfg.specs(), DATA.d, tmp_path, TrainConfig(total_steps=120))
    path = tmp_path / CURVE_FILE
    path.write_text(json.dumps({"points": [{"step": s, "saes": {}} for s in (0, 40, 80)]}))
    curve = RecoveryCurve(trainer, lambda sae: Recovery(0.5, 0.25), 40, path).attach()
    trainer.on_start(40)  # resumed from a checkpoint at step 40: the point at 80 is measured again
    trainer.on_step(79, [None])
    trainer.on_step(80, [None])
    assert [p["step"] for p in curve.points] == [0, 40, 80]
    assert curve.points[-1]["saes"] == {"relu_32_c0.3_data": {"mmcs": 0.5, "recovered": 0.25}}
    assert json.loads(path.read_text())["points"] == curve.points


def test_toy_command_with_init_prints_the_curve_summary(tmp_path, capsys):
    out = tmp_path / "toy"
    code = main(["toy", "--out", str(out), "--d", "16", "--n-features", "32", "--mean-active", "3", "--width", "32",
                 "--arch", "relu", "--l1", "0.3", "--steps", "60", "--batch-tokens", "256", "--init", "data", "tied",
                 "--curve-every", "30"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "relu_32_c0.3_data" in printed and "during training" in printed and "step 60" in printed
    assert (out / CURVE_FILE).exists() and (out / "recovery_curve.png").exists()
    assert "step 0" in format_curve_summary(json.loads((out / CURVE_FILE).read_text()))
