import torch
import pytest

from saelab.errors import ConfigError
from saelab.experiments.prune import plan_pruning, prune_features
from saelab.evals.metrics import SparsityStats
from saelab.sae import SAE
from saelab.train.spec import TrainSpec


def test_plan_kills_most_frequent_until_below_target():
    density = torch.tensor([0.5, 0.01, 0.3, 0.2, 0.05, 0.3])
    plan = plan_pruning(density, target_l0=0.5)
    # brute force: the largest density cut-off c (fewest features killed) with sum(d[d <= c]) < 0.5
    best = max(c for c in [0.0, *density.tolist()] if density[density <= c].sum() < 0.5)
    killed = set((density > best).nonzero().flatten().tolist())
    assert set(plan.killed.tolist()) == killed == {0, 2, 5}  # ties at 0.3 go together
    assert plan.expected_l0 == pytest.approx(0.26)
    assert plan.cutoff == pytest.approx(0.2)
    assert plan_pruning(density, 10.0).killed.numel() == 0
    # a tie across the boundary: killing one 0.3 reaches the target only with its twin killed too
    tie = plan_pruning(torch.tensor([0.3, 0.3, 0.1]), target_l0=0.45)
    assert set(tie.killed.tolist()) == {0, 1} and tie.expected_l0 == pytest.approx(0.1) and tie.cutoff == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        plan_pruning(density, 0)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_pruned_sae_measured_l0_matches_plan(arch):
    torch.manual_seed(0)
    sae = SAE(8, 32, arch=arch, k=6 if arch == "batchtopk" else None).eval()
    if arch == "batchtopk":
        sae.activation.set_threshold(torch.full((32,), 0.1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(2000, 8)
    density = SparsityStats().update(sae.encode(x)).density
    plan = plan_pruning(density, target_l0=2.0)
    pruned = prune_features(sae, plan.killed)
    f = pruned.encode(x)
    assert (f[:, plan.killed] == 0).all()
    measured = float((f > 0).float().sum(-1).mean())
    assert measured < 2.0 and measured == pytest.approx(plan.expected_l0, abs=1e-6)
    # the kept features are untouched
    keep = torch.ones(32, dtype=torch.bool)
    keep[plan.killed] = False
    torch.testing.assert_close(f[:, keep], sae.encode(x)[:, keep])
    assert sae.W_dec.abs().sum() > pruned.W_dec.abs().sum()  # the original is not modified


def test_topk_pruning_is_refused():
    with pytest.raises(ConfigError, match="topk"):
        prune_features(SAE(8, 16, arch="topk", k=2), torch.tensor([0]))


def test_a_compared_sweep_is_one_curve_per_architecture_and_width():
    from saelab.evals.entry import Ablation, DownstreamMetrics, MetricsEntry
    from saelab.evals.metrics import SAEMetrics
    from saelab.experiments.prune import evaluation_note, sweep_series

    def row(arch, d_sae, l0, knob):
        spec = TrainSpec(arch=arch, d_sae=d_sae, **knob).to_dict()
        down = DownstreamMetrics(3.0, 3.1, 0.1, {"zero": Ablation(5.0, 1.0, 0.95)}, 1000, True, "h")
        return MetricsEntry("r", SAEMetrics(n_tokens=10, mse=1.0, fvu=0.1, explained_variance=0.9, cos=0.9, l0=l0,
                                            d_sae=d_sae), down, spec)
    sweep = [row("relu", 64, 30.0, {"coefficient": 1.0}), row("topk", 64, 16.0, {"k": 16}),
             row("relu", 128, 25.0, {"coefficient": 1.0}), row("relu", 64, 12.0, {"coefficient": 4.0}),
             row("topk", 64, 8.0, {"k": 8})]
    series = sweep_series(sweep, d_in=16)
    assert list(series) == ["trained relu x4", "trained relu x8", "trained topk x4"]
    assert [(p[0], p[2]) for p in series["trained relu x4"]] == [(30.0, "c1"), (12.0, "c4")]
    assert [(p[0], p[2]) for p in series["trained topk x4"]] == [(16.0, "k16"), (8.0, "k8")]
    note = evaluation_note(sweep[:1], torch.zeros(4, 32), "stdlib", sweep)
    assert note == "pruned: 4 held-out contexts of stdlib x 32 tokens, 1000 predictions; trained: their run's own " \
                   "evaluation, 1000 predictions (the same count)"
