"""Each metric against a second computation (explicit loops or numpy) on small tensors."""

import json
import math

import numpy as np
import pytest
import torch

from saelab.evals import metrics as M
from saelab.errors import DataError


def _data(n=40, d=6, d_sae=10, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    f = torch.relu(torch.randn(n, d_sae, generator=g) - 0.5)
    f[:, 0] = 0.0  # a dead feature
    f[:, 1] = torch.rand(n, generator=g) + 0.1  # a feature on every token
    return x, x_hat, f


def _loop_recon(x, x_hat):
    """mse, total variance, cos by plain Python loops in float64."""
    xs, hs = x.double().tolist(), x_hat.double().tolist()
    n, d = len(xs), len(xs[0])
    mean = [sum(r[i] for r in xs) / n for i in range(d)]
    sq = sum(sum((a - b) ** 2 for a, b in zip(r, h)) for r, h in zip(xs, hs)) / n
    var = sum(sum((r[i] - mean[i]) ** 2 for i in range(d)) for r in xs) / n
    cs = []
    for r, h in zip(xs, hs):
        nr, nh = math.sqrt(sum(a * a for a in r)), math.sqrt(sum(b * b for b in h))
        cs.append(sum(a * b for a, b in zip(r, h)) / (nr * nh) if nr * nh > 0 else 0.0)
    return sq, var, sum(cs) / n


def test_reconstruction_metrics_match_loops():
    x, x_hat, _ = _data()
    sq, var, c = _loop_recon(x, x_hat)
    assert M.mse(x, x_hat) == pytest.approx(sq, rel=1e-6)
    assert M.total_variance(x) == pytest.approx(var, rel=1e-9)
    assert M.fvu(x, x_hat) == pytest.approx(sq / var, rel=1e-6)
    assert M.explained_variance(x, x_hat) == pytest.approx(1 - sq / var, rel=1e-6)
    assert M.cos(x, x_hat) == pytest.approx(c, rel=1e-6)


def test_leading_dims_are_tokens_and_mse_is_not_scaled_by_batch():
    x, x_hat, f = _data(n=24)
    assert M.mse(x.reshape(4, 6, -1), x_hat.reshape(4, 6, -1)) == pytest.approx(M.mse(x, x_hat))
    assert M.mse(torch.cat([x, x]), torch.cat([x_hat, x_hat])) == pytest.approx(M.mse(x, x_hat))
    assert M.l0(f.reshape(2, 12, -1)) == pytest.approx(M.l0(f))


def test_fvu_uses_the_mean_not_zero():
    x, x_hat, _ = _data()
    base = M.fvu(x, x_hat)
    assert M.fvu(x + 1000.0, x_hat + 1000.0) == pytest.approx(base, rel=1e-4)
    # Variance about zero would be dominated by the offset and drive fvu towards 0.
    xo = (x + 1000.0).double()
    about_zero = M.mse(x, x_hat) / xo.square().sum(1).mean().item()
    assert about_zero < base / 100
    mean_pred = x.mean(0, keepdim=True).expand_as(x)
    assert M.fvu(x, mean_pred) == pytest.approx(1.0, abs=1e-6)
    assert M.fvu(x, x) == 0.0
    assert math.isnan(M.fvu(torch.ones(5, 3), torch.zeros(5, 3)))


def test_gradients_do_not_leak_into_stats():
    x, x_hat, f = _data()
    x_hat.requires_grad_(True)
    acc = M.MetricsAccumulator().update(x, x_hat * 2, f.requires_grad_(True))
    assert not acc.recon.sse.requires_grad and not acc.sparsity.l1_sum.requires_grad


def test_cos_zero_vector_counts_as_zero():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    xh = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    assert M.cos(x, xh) == pytest.approx((1.0 + 0.0 - 1.0) / 3)


def test_sparsity_metrics_match_loops():
    _, _, f = _data()
    rows = f.tolist()
    n, k = len(rows), len(rows[0])
    density = [sum(1 for r in rows if r[j] > 0) / n for j in range(k)]
    assert M.feature_density(f).tolist() == pytest.approx(density)
    assert M.l0(f) == pytest.approx(sum(sum(1 for v in r if v > 0) for r in rows) / n)
    assert M.l0(f) == pytest.approx(float(M.feature_density(f).sum()))
    assert M.l1(f) == pytest.approx(sum(sum(abs(v) for v in r) for r in rows) / n, rel=1e-6)
    # negative values count in l1 but are not "active"
    g = torch.tensor([[-1.0, 2.0], [0.0, -3.0]])
    assert M.l1(g) == pytest.approx(3.0) and M.l0(g) == pytest.approx(0.5)


def test_sparsity_large_cpu_blocks_and_low_precision():
    g = torch.Generator().manual_seed(1)
    f = torch.relu(torch.randn(1000, 37, generator=g))  # > 256 rows: several int16 blocks
    assert torch.equal(M.SparsityStats().update(f).active, (f > 0).sum(0))
    one_block = M._count_and_l1(f, rows=1000)  # the single-reduction path used on GPUs
    assert torch.equal(one_block[0], (f > 0).sum(0))
    assert one_block[1].item() == pytest.approx(f.double().sum().item(), rel=1e-7)
    assert M.l1(f.bfloat16()) == pytest.approx(f.bfloat16().double().abs().sum(1).mean().item(),
                                               rel=1e-6)


def test_dead_dense_and_histogram():
    density = torch.tensor([0.0, 0.0, 1e-6, 1e-3, 0.05, 0.1, 0.2, 0.9], dtype=torch.float64)
    assert M.dead_count(density) == 2
    assert M.dense_count(density) == 2  # strictly above 0.1
    assert M.dense_count(density, threshold=0.01) == 4
    counts, edges = M.density_histogram(density, bins=10, eps=1e-10)
    ref_c, ref_e = np.histogram(np.log10(np.maximum(density.numpy(), 1e-10)), bins=10,
                                range=(-10, 0))
    assert counts.tolist() == ref_c.tolist()
    assert np.allclose(edges.numpy(), ref_e)
    assert counts[0] == 2 and int(counts.sum()) == 8
    # explicit edges: values outside are clamped into the end bins
    counts, _ = M.density_histogram(density, bins=[-5.0, -2.0, -1.0])
    assert counts.tolist() == [4, 4]
    with pytest.raises(DataError):
        M.density_histogram(density, bins=[0.0, -1.0])


def _one_shot_numpy(x, x_hat, f):
    x, h, f = (t.double().numpy() for t in (x, x_hat, f))
    mse = ((x - h) ** 2).sum(1).mean()
    var = ((x - x.mean(0)) ** 2).sum(1).mean()
    return {"mse": mse, "fvu": mse / var, "l0": (f > 0).sum(1).mean(),
            "l1": np.abs(f).sum(1).mean(), "density": (f > 0).mean(0)}


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_is_split_invariant(offset):
    x, x_hat, f = _data(n=97, offset=offset, seed=3)
    ref = _one_shot_numpy(x, x_hat, f)
    whole = M.MetricsAccumulator().update(x, x_hat, f).result()
    for cuts in ([1, 2, 50], [96], [0, 0, 10, 90], list(range(1, 97, 7))):
        acc = M.MetricsAccumulator()
        for a, b in zip([0] + cuts, cuts + [97]):
            acc.update(x[a:b], x_hat[a:b], f[a:b])
        r = acc.result()
        assert r.n_tokens == 97
        for k in ("mse", "fvu", "l0", "l1"):
            assert getattr(r, k) == pytest.approx(ref[k], rel=1e-6), k
        for k in ("mse", "fvu", "cos", "l1", "explained_variance"):
            assert getattr(r, k) == pytest.approx(getattr(whole, k), rel=1e-9), k
        assert np.allclose(r.density.numpy(), ref["density"])
        assert r.dead == 1 and r.dense == M.dense_count(torch.from_numpy(ref["density"]))


def test_merge_equals_single_stream():
    x, x_hat, f = _data(n=60, seed=4)
    a = M.MetricsAccumulator().update(x[:25], x_hat[:25], f[:25])
    b = M.MetricsAccumulator().update(x[25:], x_hat[25:], f[25:])
    merged, whole = a.merge(b).result(), M.MetricsAccumulator().update(x, x_hat, f).result()
    for k in ("mse", "fvu", "cos", "l0", "l1"):
        assert getattr(merged, k) == pytest.approx(getattr(whole, k), rel=1e-9)


def test_result_to_dict_is_json_and_complete():
    x, x_hat, f = _data()
    r = M.MetricsAccumulator(dense_threshold=0.5, hist_bins=5).update(x, x_hat, f).result()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["d_sae"] == 10 and d["dense_threshold"] == 0.5 and d["dead"] == 1
    assert sum(d["density_hist_counts"]) == 10 and len(d["density_hist_edges"]) == 6
    assert "density" not in d and len(r.to_dict(include_density=True)["density"]) == 10
    assert d["explained_variance"] == pytest.approx(1 - d["fvu"])
    no_f = M.MetricsAccumulator().update(x, x_hat).result().to_dict()
    assert no_f["l0"] is None and no_f["dead"] is None and no_f["mse"] == pytest.approx(d["mse"])


def test_bad_input_raises_data_error():
    x, x_hat, f = _data()
    with pytest.raises(DataError):
        M.mse(x, x_hat[:, :3])
    with pytest.raises(DataError):
        M.MetricsAccumulator().update(x, x_hat, f[:5])
    with pytest.raises(DataError, match="no tokens"):
        M.MetricsAccumulator().result()
    acc = M.MetricsAccumulator().update(x, x_hat, f)
    with pytest.raises(DataError, match="every batch"):
        acc.update(x, x_hat)
    with pytest.raises(DataError, match="d="):
        acc.update(x[:, :3], x_hat[:, :3], f)


def _loop_max_cos(learned, reference):
    out = []
    for r in reference.double():
        best = -2.0
        for v in learned.double():
            den = r.norm() * v.norm()
            best = max(best, float(r @ v / den) if den > 0 else 0.0)
        out.append(best)
    return out


def test_max_cosine_matches_loop_and_chunking():
    g = torch.Generator().manual_seed(5)
    learned, ref = torch.randn(13, 7, generator=g), torch.randn(9, 7, generator=g)
    learned[3] = 0.0
    ref[2] = 0.0
    want = _loop_max_cos(learned, ref)
    assert M.max_cosine(learned, ref).tolist() == pytest.approx(want, abs=1e-6)
    assert M.max_cosine(learned, ref, chunk=2).tolist() == pytest.approx(want, abs=1e-6)
    assert M.mmcs(learned, ref) == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert M.max_cosine(learned, ref)[2] == 0.0
    assert M.mmcs(torch.zeros(4, 7), ref) == 0.0


def test_mmcs_known_answers():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(64, 32, generator=g)
    perm = torch.randperm(64, generator=g)
    scaled_copy = ref[perm] * (torch.rand(64, 1, generator=g) + 0.5)  # positive scales
    assert M.mmcs(scaled_copy, ref) == pytest.approx(1.0, abs=1e-6)
    extra = torch.cat([scaled_copy, torch.randn(100, 32, generator=g)])  # superset
    assert M.mmcs(extra, ref) == pytest.approx(1.0, abs=1e-6)
    assert M.mmcs(-ref, ref) < 0.9  # signed: flipped directions are not recovered
    rand = M.mmcs(torch.randn(64, 32, generator=g), ref)
    assert rand < 0.6
    assert (M.max_cosine(scaled_copy, ref) > 0.9).sum() == 64
    with pytest.raises(DataError):
        M.mmcs(ref, ref[:, :5])
    with pytest.raises(DataError):
        M.mmcs(ref[0], ref)
