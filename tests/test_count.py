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
from saelab.experiments.saturation import SATURATED, fit_saturation, soft_min

WIDTHS = [64, 128, 256, 512]


@pytest.mark.parametrize("n,a", [(300, 3.0), (150, 1.5), (100, 8.0), (90, 1.0), (420, 5.0)])
def test_the_fit_recovers_n_of_a_synthetic_saturation_curve(n, a):
    fit = fit_saturation(WIDTHS, soft_min(WIDTHS, n, a))
    assert fit.n == pytest.approx(n, rel=1e-4) and fit.a == pytest.approx(a, rel=1e-3)
    assert fit.rms_log_error < 1e-6 and fit.saturated


def test_a_knee_past_the_widths_is_flagged_though_the_fit_finds_it():
    fit = fit_saturation(WIDTHS, soft_min(WIDTHS, 700, 8.0))  # the widest pair sees 73% of N
    assert fit.n == pytest.approx(700, rel=1e-2) and not fit.saturated and fit.lower_bound < 700  # a flat valley


def test_a_curve_still_growing_is_a_lower_bound_not_an_estimate():
    fit = fit_saturation(WIDTHS, [60, 120, 240, 480])  # no knee within the widths
    assert not fit.saturated and fit.lower_bound == 480 and fit.n > 480 / SATURATED


def test_a_hard_plateau_is_found_exactly():
    fit = fit_saturation(WIDTHS, [64, 128, 200, 200])
    assert fit.n == pytest.approx(200, rel=2e-3) and fit.saturated


def test_the_fit_refuses_widths_that_do_not_grow_or_too_few_points():
    with pytest.raises(ConfigError, match="must grow"):
        fit_saturation([64, 64, 128], [10, 20, 30])
    with pytest.raises(ConfigError, match="at least two"):
        fit_saturation([64], [10])


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
