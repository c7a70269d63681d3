"""The training loss of a k-sparse SAE (topk, batchtopk: `Activation.sparse_kernels`) on the
sparse kernels of saelab.sae.sparse_kernels.

The dense pre-activations z = x @ W_enc + bias are computed once, without gradients, to choose
the active entries (`activation.select(z)`, and the aux-k dead features); the values on those
entries are then re-read through `sampled_pre_acts`, whose backward is a sparse product, and
decoded by `sparse_decode`. The loss, its gradients and the trainer's bookkeeping equal the
dense path's (`SAE.loss` under `kernel_mode("dense")`) up to float rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from saelab.sae.activations import AuxInputs
from saelab.sae.model import SAE, ForwardOutput
from saelab.sae.sparse_kernels import sampled_pre_acts, sparse_decode, use_sparse


def applies(sae: SAE) -> bool:
    """Whether `sae` trains on the sparse kernels now (its architecture allows it, and the
    shape or `kernel_mode` says so)."""
    return sae.activation.sparse_kernels and use_sparse(sae.activation.k, sae.cfg.d_sae)


def sparse_loss(sae: SAE, x: Tensor, y: Tensor, dead_mask: Tensor | None, aux_k: int | None,
                aux_coefficient: float) -> ForwardOutput:
    """SAE.loss for x (N, d_in) -> y (N, d_out) on the sparse kernels (no penalty: k-sparse
    architectures have none); `feature_acts` is None."""
    with torch.no_grad():
        z = torch.addmm(sae.encoder_bias(), x, sae.W_enc)
    pattern = sae.activation.select(z)
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    sampled = functools.partial(sampled_pre_acts, x, sae.W_enc, sae.b_enc, b_dec, z=z)
    values = torch.relu(sampled(pattern))
    x_hat = sparse_decode(values, sae.W_dec, pattern) + sae.b_dec
    err = y - x_hat
    mse = err.pow(2).sum(-1).mean()
    aux = sae.activation.aux_loss(sae, AuxInputs(z, None, y, err.detach(), dead_mask, aux_k, aux_coefficient, sampled))
    with torch.no_grad():
        active = values > 0
        fired = torch.bincount(pattern.cols[active], minlength=sae.cfg.d_sae) > 0
        l0 = active.sum() / x.shape[0]
    return ForwardOutput(x_hat, None, mse + aux, mse, z.new_zeros(()), aux, fired, l0)
