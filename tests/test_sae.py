import json

import pytest
import torch

from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError
from saelab.sae import SAE, SAEConfig, geometric_median

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
K_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")


def make(arch, d_in=8, d_sae=16, **kw):
    torch.manual_seed(0)
    if arch in K_ARCHS:
        kw.setdefault("k", 3)
    sae = SAE(d_in, d_sae, arch=arch, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    if arch == "jumprelu":
        sae.activation.set_threshold(torch.rand(d_sae) * 0.3)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        sae.activation.set_threshold(torch.full((d_sae,), 0.2))
    if arch == "gated":
        with torch.no_grad():
            sae.activation.r_mag.normal_(0, 0.5)
            sae.activation.b_mag.normal_(0, 0.2)
    return sae


def reference_encode(sae, x):
    """The formula, written out elementwise-style with plain loops over features."""
    z = torch.stack([(x - sae.b_dec) @ sae.W_enc[:, j] + sae.b_enc[j] for j in range(sae.cfg.d_sae)], -1)
    arch = sae.cfg.arch
    if arch == "gated":  # SAELens's form: the magnitude path has its own weights W_enc * exp(r_mag)
        act = sae.activation
        mag = torch.stack([(x - sae.b_dec) @ (sae.W_enc[:, j] * act.r_mag[j].exp()) + act.b_mag[j]
                           for j in range(sae.cfg.d_sae)], -1)
        return torch.where(z > 0, mag.clamp(min=0), torch.zeros_like(z))
    if arch == "relu":
        return z.clamp(min=0)
    if arch == "topk":
        out = torch.zeros_like(z)
        for i in range(z.shape[0]):
            order = sorted(range(z.shape[1]), key=lambda j: -z[i, j].item())[: sae.cfg.k]
            for j in order:
                out[i, j] = max(z[i, j].item(), 0.0)
        return out
    theta = sae.threshold
    return torch.where((z > theta) & (z > 0), z, torch.zeros_like(z))


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_formula(arch):
    sae = make(arch).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, reference_encode(sae, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)
        torch.testing.assert_close(sae(x), sae.decode(f))
        # leading dimensions are kept
        assert sae.encode(x.view(5, 1, 8)).shape == (5, 1, 16)


def test_both_constructors_build_the_same_sae():
    cfg = SAEConfig(8, 16, arch="topk", k=3, hook_name="blocks.0.hook_resid_post")
    torch.manual_seed(0)
    a = SAE(cfg)
    torch.manual_seed(0)
    b = SAE(d_in=8, d_sae=16, arch="topk", k=3, hook_name="blocks.0.hook_resid_post")
    assert a.cfg == b.cfg and a.cfg is cfg and SAE.from_config(cfg).cfg is cfg
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(TypeError, match="SAEConfig alone"):
        SAE(cfg, k=4)


def test_topk_keeps_k_per_token():
    sae = make("topk", k=4).eval()
    x = torch.randn(50, 8) * 3
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 4).all() and ((f > 0).sum(-1) >= 1).all()
    out = sae.loss(x)  # the training path decodes sparsely: same result as the dense one
    torch.testing.assert_close(out.x_hat, sae.decode(f), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.fired, (f > 0).any(0)) and out.l0.item() == pytest.approx((f > 0).sum().item() / 50)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_training_keeps_k_times_batch_and_sets_threshold(arch):
    sae = make(arch, k=3)
    sae.activation._threshold.fill_(-1.0)
    sae.train()
    x = torch.randn(20, 8) * 3
    f = sae.encode(x).detach()
    z = sae.pre_acts(x).detach()
    # training keeps exactly the k * N largest relu(z) of the batch (all positive here)
    kept = torch.topk(z.relu().flatten(), 3 * 20).values
    assert kept.min() > 0 and int((f > 0).sum()) == 3 * 20
    torch.testing.assert_close(f[f > 0].sort().values, kept.sort().values, atol=0, rtol=0)
    kept_min = kept.min()
    assert torch.equal(sae.threshold, torch.full((16,), float(kept_min)))  # the first batch sets it
    sae.eval()
    g = sae.encode(x)
    # inference keeps z > threshold: on the same batch, the kept set minus its smallest value
    assert torch.equal(g, torch.where(f > kept_min, f, torch.zeros_like(f)))
    assert int((g > 0).sum()) == 3 * 20 - 1


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_kept_value():
    sae = make("batchtopk", k=2)
    sae.activation._threshold.fill_(-1.0)
    sae.train()
    lows = []
    for i in range(3):
        x = torch.randn(10, 8) * (1 + i)
        f = sae.encode(x).detach()
        lows.append(float(f[f > 0].min()))
    expected = lows[0]
    for low in lows[1:]:
        expected = 0.99 * expected + 0.01 * low
    torch.testing.assert_close(sae.threshold, torch.full((16,), expected), atol=1e-6, rtol=1e-6)


def test_batchtopk_without_threshold_refuses_inference():
    sae = SAE(8, 16, arch="batchtopk", k=2).eval()
    with pytest.raises(RuntimeError, match="threshold"):
        sae.encode(torch.randn(2, 8))


def test_jumprelu_threshold_gradient_is_rectangle_kernel():
    sae = make("jumprelu", jumprelu_bandwidth=0.5)
    x = torch.randn(64, 8)
    z = sae.pre_acts(x).detach()
    out = sae.loss(x, coefficient=0.7)
    (out.mse + out.sparsity).backward()
    theta = sae.threshold.detach()
    eps = 0.5
    kernel = ((z - theta).abs() < eps / 2).float() / eps
    # d f / d theta = -(theta/eps) K ; d mse / d f = -2 err @ W_dec^T / N ; d L0 / d theta = -(1/eps) K
    err = (x - out.x_hat).detach()
    dmse_df = -2 * err @ sae.W_dec.detach().T / x.shape[0]
    d_theta = (-(theta * kernel) * dmse_df).sum(0) + 0.7 * (-kernel).sum(0) / x.shape[0]
    # the parameter is log(theta): chain rule multiplies by theta
    torch.testing.assert_close(sae.activation.log_threshold.grad, d_theta * theta, atol=1e-5, rtol=1e-4)


def test_relu_penalty_is_decoder_weighted_l1():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2, 16)[:, None])
    x = torch.randn(10, 8)
    out = sae.loss(x, coefficient=0.3)
    f = sae.encode(x)
    f = f.detach()
    expected = 0.3 * sum(float(f[i, j]) * float(sae.W_dec[j].detach().norm()) for i in range(10) for j in range(16)) / 10
    assert out.sparsity.item() == pytest.approx(expected, rel=1e-5)
    assert out.mse.item() == pytest.approx(((x - sae(x)) ** 2).sum(-1).mean().item(), rel=1e-6)
    # the loss takes it from f's column sums (penalty_from_sums); ReLU.penalty, the class's
    # per-token formula, gives the same mean
    z = sae.pre_acts(x).detach()
    assert (0.3 * sae.activation.penalty(z, f, sae.W_dec.detach()).mean()).item() == pytest.approx(expected, rel=1e-5)
    # from sums, for one SAE and for a stack of two (the second with its decoder rows doubled)
    W = sae.W_dec.detach()
    one = sae.activation.penalty_from_sums(f.sum(0), W, 10)
    assert (0.3 * one).item() == pytest.approx(expected, rel=1e-5)
    two = sae.activation.penalty_from_sums(torch.stack([f.sum(0), f.sum(0)]), torch.stack([W, 2 * W]), 10)
    torch.testing.assert_close(two, torch.stack([one, 2 * one]))
    assert make("jumprelu").activation.penalty_from_sums(f.sum(0), W, 10) is None  # not linear in f


def test_unit_norm_decoder_constraint():
    sae = make("relu", decoder_norm="unit")
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    x = torch.randn(32, 8)
    sae.loss(x, coefficient=0.1).loss.backward()
    grad_before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * rows).sum(1).abs().max() < 1e-5
    assert not torch.allclose(grad_before, sae.W_dec.grad)
    opt.step()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


def test_aux_loss_only_trains_dead_features():
    sae = make("topk", k=2)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[5:9] = True
    x = torch.randn(30, 8)
    assert sae.loss(x).aux.item() == 0.0
    out = sae.loss(x, dead_mask=dead, aux_k=3, aux_coefficient=1.0)
    assert out.aux.item() > 0
    sae.zero_grad()
    out.aux.backward()
    enc_grad = sae.W_enc.grad.abs().sum(0)
    assert (enc_grad[~dead] == 0).all() and (enc_grad[dead] > 0).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scaling_matches_scaled_training(arch):
    sae = make(arch).eval()
    x = torch.randn(6, 8)
    s = 3.7
    with torch.no_grad():
        scaled_out = sae(s * x) / s
        sae.fold_scaling(s)
        torch.testing.assert_close(sae(x), scaled_out, atol=1e-5, rtol=1e-5)


def test_transcoder_shapes_and_bias():
    sae = SAE(8, 32, arch="relu", d_out=5)
    assert sae.cfg.is_transcoder and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(4, 8)
    assert sae(x).shape == (4, 5)
    out = sae.loss(x, target=torch.randn(4, 5))
    assert out.x_hat.shape == (4, 5)
    with pytest.raises(DataError, match="target"):
        sae.loss(x, target=torch.randn(4, 8))


def test_geometric_median_minimises_distance_sum():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(50, 3), torch.full((5, 3), 100.0)])
    m = geometric_median(x)
    cost = lambda p: (x - p).norm(dim=1).sum()
    for _ in range(20):
        assert cost(m) <= cost(m + 0.05 * torch.randn(3)) + 1e-4
    assert m.norm() < 2  # robust to the far outliers, unlike the mean
    assert x.mean(0).norm() > 5


def test_transcoder_init_from_data_keeps_b_dec_zero_and_refuses_data_decoder():
    sae = SAE(8, 16, d_out=5)
    x = torch.randn(50, 8) + 3
    sae.init_from_data(x, b_dec="mean")
    assert torch.equal(sae.b_dec.detach(), torch.zeros(5))  # an output bias: the input's mean is no estimate
    with pytest.raises(ConfigError, match="autoencoder"):
        sae.init_from_data(x, b_dec="zeros", decoder=True)


def test_init_from_data():
    sae = SAE(8, 16)
    x = torch.randn(100, 8) + 4
    sae.init_from_data(x, b_dec="mean", decoder=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    centred = (x - x.mean(0)) / (x - x.mean(0)).norm(dim=1, keepdim=True)
    # every decoder row is one of the centred samples' directions
    assert ((rows @ centred.T).max(1).values > 0.9999).all()
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)
    with pytest.raises(DataError):
        sae.init_from_data(torch.full((4, 8), float("nan")))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="swish"), "unknown architecture"),
        (dict(arch="topk", k=100), "k"),
        (dict(arch="topk"), "k"),
        (dict(decoder_norm="l2"), "decoder_norm"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SAE(8, 16, **kwargs)


def test_shape_mismatch_is_clear():
    with pytest.raises(DataError, match="expects 8"):
        SAE(8, 16).encode(torch.randn(3, 9))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(tmp_path, arch):
    sae = make(arch, hook_name="blocks.0.hook_resid_post", model_name="tiny").eval()
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s").eval()
    assert back.cfg == sae.cfg
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x))


def test_load_errors(tmp_path):
    with pytest.raises(MissingFileError):
        SAE.load(tmp_path / "nope")
    sae = make("relu")
    folder = sae.save(tmp_path / "s")
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="safetensors"):
        SAE.load(folder)
    sae.save(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="JSON"):
        SAE.load(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8}))
    with pytest.raises(ConfigError, match="d_sae"):
        SAE.load(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8, "d_sae": 99}))
    with pytest.raises(CorruptFileError, match="shape"):
        SAE.load(folder)


def test_config_dict_roundtrip():
    cfg = SAEConfig(d_in=4, d_sae=8, arch="topk", k=2, metadata={"a": 1})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_code_round_trips_to_the_dense_path(arch):
    """encode_sparse holds exactly the nonzero entries of encode; decode_sparse equals forward."""
    torch.manual_seed(0)
    sae = SAE(d_in=12, d_sae=48, arch=arch, k=5 if arch in K_ARCHS else None)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.3)
    x = torch.randn(3, 7, 12)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        sae.train(); sae.encode(x); sae.eval()  # sets its inference threshold
    dense = sae.encode(x).reshape(21, 48)
    code = sae.encode_sparse(x)
    rebuilt = torch.zeros_like(dense).scatter_add_(1, code.indices, code.values)
    assert torch.equal(rebuilt, dense)
    assert code.values.shape[1] == (5 if arch == "topk" else int((dense > 0).sum(-1).max()))
    torch.testing.assert_close(sae.decode_sparse(code), sae(x).reshape(21, 12), atol=1e-5, rtol=1e-5)


def test_decode_sparse_refuses_mismatched_shapes():
    sae = SAE(d_in=4, d_sae=8, arch="relu")
    with pytest.raises(DataError, match="one \\(N, k\\) shape"):
        sae.decode_sparse((torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_refuses_non_finite_weights_naming_the_tensor(tmp_path, bad):
    sae = make("jumprelu")
    with torch.no_grad():
        sae.W_dec[3, 5] = bad
    folder = sae.save(tmp_path / "s")
    kind = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    with pytest.raises(DataError, match=rf"tensor W_dec holds {kind} of {8 * 16} values \(the first at index \(3, 5\)\)"):
        SAE.load(folder)
    debug = SAE.load(folder, allow_nonfinite=True)  # for debugging: loads as saved
    assert torch.equal(debug.W_dec.isnan(), sae.W_dec.isnan()) and int((~debug.W_dec.isfinite()).sum()) == 1


def test_cli_refuses_a_nan_sae_in_one_line(tmp_path, capsys):
    from saelab import cli

    sae = make("relu", hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():
        sae.b_enc[2] = float("nan")
    folder = sae.save(tmp_path / "s")
    assert cli.main(["dashboard", str(folder), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "tensor b_enc holds 1 NaN" in err
