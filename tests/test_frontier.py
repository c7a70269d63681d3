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
