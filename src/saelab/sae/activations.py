"""The sparsifying nonlinearities, one small class each, chosen by name from `ACTIVATIONS`.

An SAE computes pre-activations `z = (x - b_dec) @ W_enc + b_enc` (shape `(N, d_sae)`) and an
activation turns them into sparse feature activations `f`. Each activation also owns its
sparsity penalty, so the SAE module never branches on the architecture name:

- `relu`:      f = relu(z); penalty = c * sum_i f_i * ||W_dec,i||       (Anthropic, April 2024)
- `topk`:      f keeps the k largest z per token, relu'd                 (Gao et al. 2024)
- `batchtopk`: training keeps the k*N largest relu(z) over the whole batch and tracks a threshold
               (running mean of the smallest kept value); inference is f = relu(z) * (z > threshold)
- `jumprelu`:  f = relu(z) * H(z - theta), theta learned through a straight-through estimator
               with a rectangle kernel of width `bandwidth`; penalty = c * sum_i H(z_i - theta_i)
               (Rajamanoharan et al. 2024)

Thresholds are per-feature vectors `(d_sae,)`, so a batchtopk SAE saves exactly like a jumprelu one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Activation(nn.Module):
    """Interface: `forward(z) -> f`; `penalty(z, f, dec_norms) -> per-token penalty (N,)`.

    Two optional fast paths the SAE's training loss uses when an activation offers them:
    `weighted_l1` (the penalty is f @ dec_norms, so it rides along in the decoder product as one
    extra output column), and `sparse(z) -> (values, indices)` (k per token, decoded with
    embedding_bag instead of a dense (N, d_sae) product)."""

    uses_k = False
    has_threshold = False
    weighted_l1 = False
    sparse = None

    def penalty(self, z: Tensor, f: Tensor, dec_norms: Tensor) -> Tensor:
        return z.new_zeros(z.shape[0])


class ReLU(Activation):
    weighted_l1 = True

    def forward(self, z: Tensor) -> Tensor:
        # in place: z is a fresh pre-activation nobody else reads (its GEMM's backward needs only
        # the GEMM's inputs), and a new (N, d_sae) buffer costs more than the relu itself on CPU
        return torch.relu_(z)

    def penalty(self, z: Tensor, f: Tensor, dec_norms: Tensor) -> Tensor:
        return f @ dec_norms


class TopK(Activation):
    uses_k = True

    def __init__(self, d_sae: int, k: int):
        super().__init__()
        self.k = k

    def forward(self, z: Tensor) -> Tensor:
        values, indices = self.sparse(z)
        return torch.zeros_like(z).scatter_(-1, indices, values)

    def sparse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The k largest pre-activations per token, relu'd: values and indices, (N, k) each."""
        top = torch.topk(z, self.k, dim=-1, sorted=False)
        return torch.relu(top.values), top.indices


class _JumpReLUFn(torch.autograd.Function):
    """f = relu(z) * H(z - theta). d f / d theta is the rectangle-kernel pseudo-derivative
    -(theta / eps) * K((z - theta) / eps); d f / d z = H(z - theta) (for theta > 0)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return torch.relu(z) * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        gate = (z > theta) & (z > 0)
        kernel = ((z - theta).abs() < ctx.eps / 2).to(z.dtype) / ctx.eps
        grad_theta = -(theta * kernel * grad).sum(0)
        return grad * gate, grad_theta, None


class _StepFn(torch.autograd.Function):
    """H(z - theta) with pseudo-derivative -(1 / eps) K((z - theta) / eps) with respect to theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        kernel = ((z - theta).abs() < ctx.eps / 2).to(z.dtype) / ctx.eps
        return None, -(kernel * grad).sum(0), None


class JumpReLU(Activation):
    has_threshold = True

    def __init__(self, d_sae: int, init_threshold: float = 1e-3, bandwidth: float = 1e-3):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def set_threshold(self, threshold: Tensor) -> None:
        with torch.no_grad():
            self.log_threshold.copy_(threshold.clamp_min(1e-12).log())

    def forward(self, z: Tensor) -> Tensor:
        return _JumpReLUFn.apply(z, self.threshold, self.bandwidth)

    def penalty(self, z: Tensor, f: Tensor, dec_norms: Tensor) -> Tensor:
        return _StepFn.apply(z, self.threshold, self.bandwidth).sum(-1)


class BatchTopK(Activation):
    uses_k = True
    has_threshold = True

    def __init__(self, d_sae: int, k: int, threshold_decay: float = 0.99):
        super().__init__()
        self.k = k
        self.threshold_decay = threshold_decay
        self.register_buffer("_threshold", torch.full((d_sae,), -1.0))

    @property
    def threshold(self) -> Tensor:
        return self._threshold

    def set_threshold(self, threshold: Tensor) -> None:
        self._threshold.copy_(threshold.to(self._threshold))

    def forward(self, z: Tensor) -> Tensor:
        if not self.training:
            if (self._threshold < 0).any():
                raise RuntimeError("batchtopk SAE has no inference threshold yet: train it, or call .train() to use batch top-k")
            return torch.relu(z) * (z > self._threshold)
        acts = torch.relu(z)
        flat = acts.flatten()
        top = torch.topk(flat, min(self.k * z.shape[0], flat.numel()), sorted=False)
        f = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(z)
        self._update_threshold(top.values.detach())
        return f

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        kept = kept[kept > 0]
        if kept.numel() == 0:
            return
        low = kept.min()
        if (self._threshold < 0).all():
            self._threshold.fill_(low)
        else:
            self._threshold.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * low)


ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
}
