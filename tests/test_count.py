"""saelab count: the saturation estimator, distinct directions, width checks, and the method on
toy data where the number of features is known."""

import json

import numpy as np
import pytest
import torch

from saelab.cli import main
from saelab.errors import ConfigError
from saelab.evals.metrics import distinct_rows
from saelab.experiments.count import CountConfig
from saelab.experiments.saturation import doubling_gains, estimate_count

WIDTHS = [64, 128, 256, 512]


@pytest.mark.parametrize("n", [64, 128, 256])
def test_the_estimate_is_the_count_where_doubling_stops_finding_features(n):
    """Counts min(w, N) with a creep of 10% per doubling past N: the estimate is N exactly."""
    est = estimate_count(WIDTHS, _creeping(n))
    assert est.saturated and est.at == n and est.n == n


def _creeping(n, widths=WIDTHS):
    return [min(w, n) * (1 + 0.1 * max(0.0, np.log2(w / n))) for w in widths]


def test_a_knee_between_widths_is_read_at_a_width_of_the_sweep_and_finer_widths_read_closer():
    """The rule's resolution is the width grid: N = 200 is read at 256 (a little creep), N = 160
    at 128 (short: the step to 256 grew under 40%); widths 1.5x apart read 160 at 192."""
    assert estimate_count(WIDTHS, _creeping(200)).n == pytest.approx(_creeping(200)[2])
    assert estimate_count(WIDTHS, _creeping(160)).n == 128
    fine = [64, 96, 128, 192, 256, 384, 512]
    est = estimate_count(fine, _creeping(160, fine))
    assert est.at == 192 and est.n == pytest.approx(_creeping(160, fine)[3]) and 1 < est.n / 160 < 1.03


def test_the_toy_runs_measured_give_the_estimates_the_docstring_states():
    """m(w) of nine measured toy runs (true N: counts at 1x, 2x, ... of d): 0.91-1.04 of N."""
    runs = [(256, [55, 127, 235, 264]), (256, [54, 124, 243, 258]), (128, [59, 125, 142]), (64, [22, 62, 78]),
            (48, [24, 48, 61]), (24, [13, 24, 28]), (24, [11, 22, 27]), (24, [15, 25, 30]), (24, [12, 24, 31])]
    for n, matched in runs:
        est = estimate_count([2 ** i for i in range(len(matched))], matched)
        assert est.saturated and 0.91 <= est.n / n <= 1.05, (n, est)


def test_a_decelerating_count_is_still_rising():
    """The default LM's residual stream (measured): +80%, then +47% per doubling: not levelled off."""
    est = estimate_count([128, 256, 512], [82, 148, 218])
    assert not est.saturated and est.n == 218


def test_a_count_still_growing_is_a_lower_bound():
    est = estimate_count(WIDTHS, [60, 120, 240, 470])
    assert not est.saturated and est.n == 470 and est.at is None
    assert est.gains == pytest.approx([1.0, 1.0, 470 / 240 - 1])


def test_gains_are_per_doubling_whatever_the_width_steps():
    assert doubling_gains([64, 256], [100, 400]) == pytest.approx([1.0])  # x4 width, x4 count: +100% per doubling
    assert doubling_gains([64, 128], [0, 10]) == [np.inf]


def test_the_estimate_refuses_widths_that_do_not_grow_or_too_few_points():
    with pytest.raises(ConfigError, match="must grow"):
        estimate_count([64, 64, 128], [10, 20, 30])
    with pytest.raises(ConfigError, match="at least two"):
        estimate_count([64], [10])


def test_widths_that_do_not_grow_are_an_error():
    with pytest.raises(ConfigError, match="must grow"):
        CountConfig(widths=[1, 4, 2, 8])
    with pytest.raises(ConfigError, match="must grow"):
        CountConfig(widths=[1, 2, 2, 4])
    with pytest.raises(ConfigError, match="at least three"):
        CountConfig(widths=[1, 2])


def test_the_command_says_so_in_one_line(capsys):
    assert main(["count", "--toy", "32", "--widths", "1", "4", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "must grow" in err and "1 4 2" in err


def test_distinct_rows_count_near_copies_once():
    w = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0.05, 0], [0, 0, 0], [-1, 0, 0], [0, 0.99, 0.1]])
    assert distinct_rows(w, 0.9).tolist() == [True, True, False, True, True, False]
    big = torch.randn(300, 4)
    assert torch.equal(distinct_rows(big, 0.95, chunk=7), distinct_rows(big, 0.95))


def test_count_on_toy_data_finds_the_true_number_of_features(tmp_path, capsys):
    """d=16, 24 independent features, 2 active: estimated 24, 25, 24 over seeds 0-2 (measured);
    the four widths train in one run (one config.json, four specs)."""
    out = tmp_path / "count"
    code = main(["count", "--toy", "24", "--d", "16", "--mean-active", "2", "--uncorrelated", "--steps", "600",
                 "--batch-tokens", "256", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "true N = 24" in printed and "N ~ 24" in printed
    result = json.loads((out / "count.json").read_text())
    (knob,) = result["counts"]
    assert knob["estimate"]["saturated"] and 0.9 <= knob["estimate"]["n"] / 24 <= 1.1
    assert [w["width"] for w in knob["widths"]] == [16, 32, 64, 128] and knob["widths"][-1]["matched"] is None
    assert all(w["truth_recovered"] == 24 for w in knob["widths"][1:])
    assert len(json.loads((out / "config.json").read_text())["specs"]) == 4
    assert (out / "count.png").stat().st_size > 0 and (out / "count.txt").exists()


def test_count_on_a_model_with_the_toy_beside_it(tmp_path, tiny_lm_path, capsys):
    """The LM path end to end on the tiny LM (too short to count anything: the wiring), with
    --beside-toy: the toy sweep at the hook's width, its L1 scaled to the toy's, and the
    side-by-side recovery figure."""
    out = tmp_path / "lm"
    code = main(["count", "--model", str(tiny_lm_path), "--hook", "blocks.0.mlp.hook_post", "--widths", "1", "2", "4",
                 "--coefficient", "1.5", "3", "--steps", "20", "--batch-tokens", "128", "--train-contexts", "32",
                 "--eval-contexts", "4", "--beside-toy", "64", "--out", str(out)])
    assert code == 0
    lm = json.loads((out / "count.json").read_text())
    assert lm["d_in"] == 128 and lm["source"].endswith("blocks.0.mlp.hook_post") and lm["truth"] is None
    assert [c["knob"] for c in lm["counts"]] == ["c1.5", "c3"]
    widths = lm["counts"][0]["widths"]
    assert [w["width"] for w in widths] == [128, 256, 512] and widths[0]["mmcs_widest"] is not None
    assert widths[-1]["mmcs_widest"] is None and widths[0]["truth_mmcs"] is None
    toy = json.loads((out / "toy" / "count.json").read_text())
    assert toy["truth"] == 64 and toy["d_in"] == 128 and [c["value"] for c in toy["counts"]] == pytest.approx([0.15, 0.3])
    assert (out / "beside_toy.png").stat().st_size > 0 and (out / "count.png").stat().st_size > 0
    assert "true N = 64" in capsys.readouterr().out
