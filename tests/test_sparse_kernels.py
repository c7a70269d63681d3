"""The sparse kernels (saelab.sae.sparse_kernels) and the sparse training step (sae/sparse_step):
each primitive against its dense formula, the autograd Functions against finite differences, and
SAE.loss on the sparse path against the dense path, values and gradients, for topk, batchtopk and
aux-k."""

import pytest
import torch

from saelab.sae import SAE
from saelab.sae.sparse_kernels import (
    SparsePattern, kernel_mode, sampled_pre_acts, sparse_decode, use_sparse,
)


def _pattern(n=6, d=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(n)])
    return idx, SparsePattern.from_rows(idx, d)


def _dense(pattern, values):
    out = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=values.dtype)
    out[pattern.rows, pattern.cols] = values
    return out


def test_pattern_primitives_equal_their_dense_formulas():
    torch.manual_seed(0)
    idx, p = _pattern()
    v = torch.randn(p.cols.numel())
    S = _dense(p, v)
    assert torch.equal((S != 0), torch.zeros_like(S, dtype=torch.bool).scatter_(1, idx, True))
    W, A, B = torch.randn(10, 4), torch.randn(6, 4), torch.randn(4, 10)
    torch.testing.assert_close(p.matmul(v, W), S @ W)
    torch.testing.assert_close(p.sample(A, B), (A @ B)[p.rows, p.cols])
    torch.testing.assert_close(p.transpose_matmul(v, A), S.T @ A)
    torch.testing.assert_close(p.gather(A @ B), (A @ B)[p.rows, p.cols])


def test_pattern_from_flat_allows_rows_of_any_length():
    flat = torch.tensor([13, 2, 0, 27, 25])  # rows 0 (0, 2), 1 (13), 2 (25, 27), 3 empty; 10 cols
    p = SparsePattern.from_flat(flat, 4, 10)
    assert p.crow.tolist() == [0, 2, 3, 5, 5]
    assert p.cols.tolist() == [0, 2, 3, 5, 7] and p.rows.tolist() == [0, 0, 1, 2, 2]
    v, W = torch.randn(5), torch.randn(10, 3)
    torch.testing.assert_close(p.matmul(v, W), _dense(p, v) @ W)


def test_autograd_functions_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    _, p = _pattern(n=5, d=7, k=3)
    v = torch.randn(p.cols.numel(), dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_decode(a, b, p), (v, W))
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sampled_pre_acts(*a, p), (x, W_enc, b_enc, b_dec))
    assert torch.autograd.gradcheck(lambda a, b, c: sampled_pre_acts(a, b, c, None, p), (x, W_enc, b_enc))
    # given the dense z, the forward reads it instead of recomputing, with the same result
    z = (x - b_dec) @ W_enc + b_enc
    torch.testing.assert_close(sampled_pre_acts(x, W_enc, b_enc, b_dec, p, z), (z)[p.rows, p.cols])
    torch.testing.assert_close(sampled_pre_acts(x, W_enc, b_enc, b_dec, p), z[p.rows, p.cols])


def test_stacked_patterns_use_each_saes_own_block_of_weights():
    """Two SAEs stacked (blocks=2) give what each gives alone, values and gradients."""
    torch.manual_seed(0)
    n, N, d_in, D = 2, 5, 4, 7
    x = torch.randn(N, d_in)
    W_enc, b_enc = torch.randn(n, d_in, D, requires_grad=True), torch.randn(n, D, requires_grad=True)
    b_dec, W_dec = torch.randn(n, d_in, requires_grad=True), torch.randn(n, D, 3, requires_grad=True)
    z = torch.baddbmm((b_enc - torch.bmm(b_dec[:, None], W_enc)[:, 0])[:, None], x.expand(n, N, d_in), W_enc)
    idx = torch.topk(z, 3, dim=-1).indices
    stacked = SparsePattern.from_rows(idx, D, blocks=n)
    out = sparse_decode(torch.relu(sampled_pre_acts(x, W_enc, b_enc, b_dec, stacked, z)), W_dec, stacked)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    grads = [t.grad.clone() for t in (W_enc, b_enc, b_dec, W_dec)]
    for i in range(n):
        alone = [t.detach()[i].clone().requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
        p = SparsePattern.from_rows(idx[i], D)
        mine = sparse_decode(torch.relu(sampled_pre_acts(x, *alone[:3], p)), alone[3], p)
        torch.testing.assert_close(mine, out[i * N:(i + 1) * N])
        (mine * torch.arange(i * mine.numel(), (i + 1) * mine.numel()).view_as(mine).sin()).sum().backward()
        for g, t in zip(grads, alone):
            torch.testing.assert_close(t.grad, g[i])


def _loss_and_grads(sae, x, y, dead, mode):
    sae.zero_grad(set_to_none=True)
    with kernel_mode(mode):
        out = sae.loss(x, y, dead_mask=dead, aux_k=4)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_and_dense_paths_give_the_same_loss_and_gradients(arch, transcoder, with_dead):
    torch.manual_seed(1)
    d_out = 6 if transcoder else None
    sae = SAE(8, 64, arch=arch, k=5, d_out=d_out)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(32, 8)
    y = torch.randn(32, 6) if transcoder else x
    dead = (torch.arange(64) % 3 == 0) if with_dead else None
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    dense, g_dense = _loss_and_grads(sae, x, y, dead, "dense")
    sae.load_state_dict(state)  # batchtopk's running threshold moves with each step
    sparse, g_sparse = _loss_and_grads(sae, x, y, dead, "sparse")
    assert sparse.feature_acts is None
    for name in ("loss", "mse", "aux", "l0"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    assert (float(sparse.aux.detach()) > 0) == with_dead
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.fired, dense.fired)
    for name, g in g_dense.items():
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-4, atol=1e-6, msg=name)
    if arch == "batchtopk":  # the threshold moved the same way on both paths
        after_sparse = sae.activation.threshold.clone()
        sae.load_state_dict(state)
        _loss_and_grads(sae, x, y, dead, "dense")
        torch.testing.assert_close(after_sparse, sae.activation.threshold)


def test_the_kernel_is_chosen_by_shape_and_can_be_forced():
    assert use_sparse(32, 16384) and not use_sparse(32, 64)
    with kernel_mode("dense"):
        assert not use_sparse(32, 16384)
    with kernel_mode("sparse"):
        assert use_sparse(32, 64)
    with pytest.raises(ValueError, match="kernel mode"):
        with kernel_mode("fast"):
            pass


def test_matryoshka_stays_on_the_dense_path():
    sae = SAE(8, 32, arch="matryoshka_batchtopk", k=3)
    x = torch.randn(16, 8)
    with kernel_mode("sparse"):
        out = sae.loss(x)
    assert out.feature_acts is not None
