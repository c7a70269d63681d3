"""saelab frontier: the coefficient bisection (on a fake monotone L0 and on real toy training),
the crossing point against hand-computed examples, unreachable targets, and the experiment on
the tiny LM, whose pruned rows must be exactly run_prune's."""

import math

import pytest

from saelab.errors import ConfigError
from saelab.experiments.coefficient_search import round_sig, search_coefficients
from saelab.experiments.crossing import crossings, curve_crossing


def power_law(a=1000.0, alpha=0.7, calls=None):
    """L0(c) = a * c^-alpha, recording each call's coefficients."""
    def measure(cs):
        if calls is not None:
            calls.append(list(cs))
        return [a * c ** -alpha for c in cs]
    return measure


def test_bisection_brackets_and_converges_on_a_monotone_l0():
    calls = []
    targets = [30.0, 100.0, 400.0]
    searches = search_coefficients(power_law(calls=calls), targets, 0.5, 500.0, tolerance=0.05, rounds=8)
    assert calls[0] == [0.5, 500.0]  # the bounds first, in one call
    assert all(len(set(c)) == len(c) for c in calls)  # a round trains each coefficient once
    tried = [c for call in calls for c in call]
    for s, t in zip(searches, targets):
        assert s.converged and abs(1000 * s.coefficient ** -0.7 - t) <= 0.05 * t
        assert s.l0_lo > t >= s.l0_hi and s.lo < s.hi  # the bracket holds the target
        assert s.coefficient in tried  # a converged target takes a coefficient that was measured
    # rounds 1..: every midpoint of an open bracket is the geometric mean of its ends
    assert calls[1] == [round_sig(math.sqrt(0.5 * 500.0))]


def test_unconverged_target_takes_the_log_log_interpolation():
    # rounds=0: only the bounds; for a power law the interpolation in log-log is exact
    [s] = search_coefficients(power_law(), [50.0], 1.0, 100.0, tolerance=1e-6, rounds=0)
    assert not s.converged
    assert s.coefficient == round_sig((1000 / 50.0) ** (1 / 0.7))


def test_bisection_takes_points_of_other_targets():
    calls = []
    search_coefficients(power_law(calls=calls), [30.0, 31.0], 0.5, 500.0, tolerance=0.01, rounds=6)
    # the two targets share brackets until they part: one midpoint per round while they do
    assert [len(c) for c in calls[1:4]] == [1, 1, 1]


@pytest.mark.parametrize("targets, match", [([5000.0], "cannot be reached by training"),
                                            ([0.01], "cannot be reached by training")])
def test_unreachable_training_targets(targets, match):
    with pytest.raises(ConfigError, match=match) as err:
        search_coefficients(power_law(), targets, 1.0, 100.0)
    assert "train to L0 1000..39.81" in str(err.value)  # says what the bounds reach


def test_bad_bounds():
    with pytest.raises(ConfigError, match="0 < low < high"):
        search_coefficients(power_law(), [10.0], 5.0, 1.0)


def test_bisection_with_real_training_on_toy_data(tmp_path):
    """Each round trains its coefficients together (one toy sweep); the found coefficient
    trains, alone, to an L0 within tolerance of the target."""
    from saelab.data.toy import ToyDataConfig
    from saelab.pipelines.toy import ToySweepConfig, run_toy_sweep

    data = ToyDataConfig(d=16, n_features=48, mean_active=3, batch_size=256)

    def l0s(cs, folder=None):
        cfg = ToySweepConfig(data=data, width=48, arch=["relu"], coefficient=list(cs), steps=150, eval_batches=2)
        return [row.recon.l0 for row in run_toy_sweep(cfg, tmp_path / (folder or "_".join(map(str, cs))))]

    [s] = search_coefficients(l0s, [8.0], 0.01, 3.0, tolerance=0.1, rounds=6)
    assert s.converged
    [again] = l0s([s.coefficient], folder="again")
    assert again == pytest.approx(8.0, rel=0.1)


# ---- the crossing point ---------------------------------------------------------------------
def test_crossing_hand_computed():
    pruned = [(10.0, 0.5), (100.0, 0.9)]
    trained = [(10.0, 0.7), (100.0, 0.8)]
    # in u = log10(L0 / 10): trained - pruned = 0.2 - 0.3 u = 0 at u = 2/3
    found, overlap, _ = crossings(pruned, trained)
    assert found == [pytest.approx(10 * 10 ** (2 / 3))] and overlap == (10.0, 100.0)
    c = curve_crossing(pruned, trained, "loss_recovered", higher_is_better=True)
    assert c.better_below == "trained" and "46.4" in c.summary and "trained SAEs are better below" in c.summary
    # lower is better (MSE): the same curves mean pruned leads below the crossing
    assert curve_crossing(pruned, trained, "mse", higher_is_better=False).better_below == "pruned"


def test_crossing_uses_the_overlap_and_every_measured_l0():
    # pruned measured at 20, 40, 80; trained at 30 and 60: overlap 30..60, and pruned's kink at 40 counts
    pruned = [(20.0, 0.0), (40.0, 1.0), (80.0, 0.0)]
    trained = [(30.0, 0.6), (60.0, 0.6)]
    found, overlap, diff = crossings(pruned, trained)
    assert overlap == (30.0, 60.0) and len(diff) == 3  # 30, 40, 60
    # pruned rises from 30 to 40: 0.415 + 0.585 * log(x/30)/log(40/30) = 0.6 ...
    p30 = math.log(30 / 20) / math.log(2)
    x1 = math.exp(math.log(30) + (0.6 - p30) / (1 - p30) * math.log(40 / 30))
    # ... and falls from 40 to 80: 1 - log(x/40)/log(2) = 0.6
    x2 = 40 * 2 ** 0.4
    assert found == [pytest.approx(x1), pytest.approx(x2)]


def test_no_crossing_and_no_overlap():
    c = curve_crossing([(10.0, 0.2), (50.0, 0.5)], [(20.0, 0.9), (60.0, 0.95)], "loss_recovered", True)
    assert c.l0 == [] and c.better_below == "trained" and "whole shared range L0 20..50" in c.summary
    c = curve_crossing([(10.0, 0.2)], [(20.0, 0.9)], "loss_recovered", True)
    assert c.overlap is None and "do not overlap" in c.summary


# ---- the experiment on the tiny LM ----------------------------------------------------------
def tiny_config(corpus, **kw):
    """Sized for the tiny LM (d_model 32, context 32): seconds per training pass."""
    from saelab.experiments.frontier import FrontierConfig

    return FrontierConfig(**{**dict(target_l0=[20.0, 27.0], expansion=2, base_coefficient=1.0, steps=50,
                                    train_contexts=32, eval_contexts=4, batch_tokens=128, context_length=32,
                                    search_rounds=2, tolerance=0.15, source=str(corpus)), **kw})


@pytest.mark.slow
def test_frontier_on_the_tiny_lm(tiny_lm, corpus, tmp_path):
    import json

    from saelab.experiments.frontier import format_frontier, run_frontier
    from saelab.experiments.prune import PruneConfig, run_prune
    from saelab.lm.resolve import heldout_contexts
    from saelab.sae import SAE

    cfg = tiny_config(corpus)
    result = run_frontier(tiny_lm, tmp_path / "f", cfg)
    # the pruned points are run_prune's on the same SAE and contexts, exactly
    tokens = heldout_contexts(tiny_lm, cfg.source, cfg.eval_contexts, cfg.context_length)
    ref = run_prune(tiny_lm, SAE.load(result.base_path), tokens, tmp_path / "ref", PruneConfig(target_l0=cfg.target_l0))
    pruned = result.family("pruned")
    assert [r.recon.to_dict() for r in pruned] == [r.recon.to_dict() for r in ref.rows[1:]]
    assert [r.downstream.to_dict() for r in pruned] == [r.downstream.to_dict() for r in ref.rows[1:]]
    assert result.family("base")[0].recon.to_dict() == ref.rows[0].recon.to_dict()
    # trained: one per target; a converged search ran at the full length, so its row is that run's
    trained = result.family("trained")
    assert [r["target_l0"] for r in trained] == cfg.target_l0 and any(s.converged for s in result.searches)
    for row, s in zip(trained, result.searches):
        assert row["coefficient"] == s.coefficient and row.spec["coefficient"] == s.coefficient
        if s.converged:
            assert row.recon.l0 == row["search_l0"] == pytest.approx(s.target_l0, rel=cfg.tolerance)
        assert SAE.load(row["sae_path"]).cfg.d_sae == 64  # same width as the base
    saved = json.loads((tmp_path / "f" / "frontier.json").read_text())
    assert saved["config"]["target_l0"] == cfg.target_l0 and len(saved["crossings"]) == 3
    assert len(saved["rows"]) == 1 + 2 * len(cfg.target_l0)
    assert (tmp_path / "f" / "frontier.png").stat().st_size > 0
    assert "loss_recovered: " in format_frontier(result)


def random_sae(lm, **kw):
    """An untrained SAE on the tiny LM's layer-0 residual stream (L0 about half its features)."""
    import torch

    from saelab.sae import SAE

    torch.manual_seed(0)
    return SAE(lm.d_model, 64, hook_name="blocks.0.hook_resid_post", **kw).eval()


def test_unreachable_and_refused_before_any_training(tiny_lm, corpus, tmp_path):
    from saelab.experiments.frontier import run_frontier

    sae = random_sae(tiny_lm)
    sae_path = sae.save(tmp_path / "sae")
    with pytest.raises(ConfigError, match="cannot be reached by pruning: the base SAE's L0 is"):
        run_frontier(tiny_lm, tmp_path / "a", tiny_config(corpus, target_l0=[5.0, 1000.0]), sae=sae, sae_path=sae_path)
    with pytest.raises(ConfigError, match="records no training coefficient"):
        run_frontier(tiny_lm, tmp_path / "b", tiny_config(corpus, target_l0=[5.0]), sae=sae, sae_path=sae_path)
    with pytest.raises(ConfigError, match="would hold the SAE it reads"):
        run_frontier(tiny_lm, tmp_path, tiny_config(corpus), sae=sae, sae_path=sae_path)
    with pytest.raises(ConfigError, match="set their L0 with k"):
        run_frontier(tiny_lm, tmp_path / "c", tiny_config(corpus), sae=random_sae(tiny_lm, arch="topk", k=4))
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))  # nothing trained or written


def test_cli_refuses_base_options_beside_an_sae(tmp_path, capsys):
    from saelab.cli import main

    assert main(["frontier", str(tmp_path / "sae"), "--arch", "jumprelu"]) == 2
    assert "error: --arch: these set the base trained here" in capsys.readouterr().err
