"""The architectures: one small class each, owning everything that depends on the architecture.

An SAE computes pre-activations `z = (x - b_dec) @ W_enc + b_enc` (shape `(N, d_sae)`); its
architecture turns them into sparse feature activations `f`, and decides the rest of the policy,
so the SAE module, its trainer and the folder format never branch on the architecture's name:

- construction from an SAEConfig (`from_config`) and the settings that apply (`settings`, `knob`);
- the decoder's initial row norm and whether rows are kept at unit norm;
- the training loss parts: the sparsity penalty (`penalty`, or a `penalty_column` read off f's
  column sums), and extra terms (`aux_loss`: aux-k, gated's frozen-decoder reconstruction,
  matryoshka's nested prefixes);
- capabilities: a native sparse code with k slots per token (`per_token_k`), aux-k over dead
  features (`uses_aux_k`), Anthropic resampling (`resamples`), a threshold (`has_threshold`);
- how it is saved: its extra tensors and its SAELens architecture names.

This module holds the interface and the four classic architectures; `gated.py` and
`matryoshka.py` add one class each, and `architectures.py` is the name -> class registry.
Thresholds are per-feature vectors `(d_sae,)`, so a batchtopk SAE saves exactly like a jumprelu one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.sae.sparse_kernels import SparsePattern, sparse_decode

if TYPE_CHECKING:
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE


class AuxInputs(NamedTuple):
    """What an architecture's extra loss terms may read, for a batch of N tokens."""

    z: Tensor  # (N, d_sae) pre-activations (relu has overwritten them with f in place)
    f: Tensor | None  # (N, d_sae) feature activations; None where decoded sparsely (topk)
    y: Tensor  # (N, d_out) the target
    residual: Tensor  # (N, d_out) y - x_hat, detached
    dead_mask: Tensor | None  # (d_sae,) bool: features the trainer counts as dead (aux-k archs)
    aux_k: int | None  # aux-k: dead features per token that reconstruct the residual (None: d_in // 2)
    aux_coefficient: float  # aux-k: weight of its loss
    # the sparse path (saelab.sae.sparse_step): z is detached, and this gives the differentiable
    # pre-activations on a SparsePattern; None on the dense path
    sampled: Callable[[SparsePattern], Tensor] | None = None


class Activation(nn.Module):
    """The architecture interface (see the module docstring). Subclasses set the class
    attributes below and override what differs; the defaults describe a penalty-free
    architecture with a dense code, saved as SAELens's `saelens_name`."""

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()  # ArchOptions fields (beyond arch) it reads
    knob: ClassVar[str] = "coefficient"  # what a sweep varies: "k" or the sparsity "coefficient"
    saelens_name: ClassVar[str] = ""  # SAELens "architecture" of the saved SAE folder
    saelens_transcoder_name: ClassVar[str | None] = None  # ... of a transcoder; None: SAELens has none
    saelens_native: ClassVar[bool] = True  # a SAELens folder named `saelens_name` loads as this class
    saelens_training_name: ClassVar[str | None] = None  # SAELens's name for its training checkpoint
    saved_names: ClassVar[dict[str, str]] = {}  # SAE tensors saved under another name (gated: b_gate)
    per_token_k = False  # sparse_code is native: exactly k slots per token (prune refuses it)
    uses_aux_k = False  # dead features train through the aux-k loss
    resamples = False  # dead features may be resampled (Anthropic)
    has_threshold = False
    # training may run on saelab.sae.sparse_kernels: the loss is reconstruction + aux-k, and
    # `select(z)` gives the active entries as a SparsePattern (saelab.sae.sparse_step)
    sparse_kernels = False
    # same-shaped SAEs of a sweep may train stacked (saelab.train.batched): features, select and
    # penalty_column work on (n, N, d_sae) stacks, and the class holds no per-SAE tensors
    stackable = False

    @classmethod
    def from_config(cls, cfg: "SAEConfig") -> "Activation":
        return cls()

    @classmethod
    def decoder_init_norm(cls, cfg: "SAEConfig") -> float:
        """Norm of every decoder row at initialisation."""
        return 1.0

    @classmethod
    def unit_norm_decoder(cls, cfg: "SAEConfig") -> bool:
        """Whether the trainer keeps decoder rows at unit norm."""
        return False

    @classmethod
    def check_options(cls, opts, d_sae: int | None) -> None:
        """Validate the settings this architecture reads (d_sae None: not known yet)."""

    @classmethod
    def saelens_architecture_name(cls, transcoder: bool) -> str:
        """The "architecture" cfg.json names: a transcoder SAELens lacks is written under the
        SAE's name with d_out (a folder only saelab reads)."""
        return (cls.saelens_transcoder_name or cls.saelens_name) if transcoder else cls.saelens_name

    @classmethod
    def saelens_keys(cls, cfg: "SAEConfig") -> dict:
        """cfg.json keys SAELens needs for this architecture (6's own and 5's flat ones)."""
        return {"activation_fn_str": "relu", "activation_fn_kwargs": {}}

    def features(self, z: Tensor, b_enc: Tensor) -> Tensor:
        """f (N, d_sae) from pre-activations z, which include the encoder bias b_enc (only gated
        reads b_enc apart: its magnitude path rescales z - b_enc)."""
        return self(z)

    def sparse_code(self, z: Tensor, b_enc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(values, indices) (N, w): the active features of each token, as many slots w as the
        busiest token needs, zero-padded. `per_token_k` architectures override it natively."""
        f = self.features(z, b_enc)
        tok, feat = torch.nonzero(f, as_tuple=True)  # row-major: each token's features together
        counts = torch.bincount(tok, minlength=f.shape[0])
        width = max(1, int(counts.max())) if tok.numel() else 1
        slot = torch.arange(tok.numel(), device=f.device) - (torch.cumsum(counts, 0) - counts)[tok]
        values = f.new_zeros(f.shape[0], width)
        indices = torch.zeros(f.shape[0], width, dtype=torch.long, device=f.device)
        values[tok, slot], indices[tok, slot] = f[tok, feat], feat
        return values, indices

    def penalty_column(self, W_dec: Tensor) -> Tensor | None:
        """(d_sae, 1) weights w when the penalty is linear in f (penalty = f @ w): the SAE then
        takes its batch mean from f's column sums, (sum_n f_n) . w / N. None otherwise."""
        return None

    def penalty_from_sums(self, sums: Tensor, W_dec: Tensor, n_tokens: int) -> Tensor | None:
        """The batch mean of a penalty linear in f, from f's column sums `sums` (..., d_sae):
        (sums . w) / N per SAE, for one SAE or a stack (W_dec (..., d_sae, d_out)). None when the
        penalty is not linear in f (then `penalty` gives it per token)."""
        column = self.penalty_column(W_dec)
        return None if column is None else (sums * column[..., 0]).sum(-1) / n_tokens

    def penalty(self, z: Tensor, f: Tensor, W_dec: Tensor) -> Tensor:
        """Per-token sparsity penalty (N,); a linear one is f @ penalty_column."""
        column = self.penalty_column(W_dec)
        return f @ column[:, 0] if column is not None else z.new_zeros(z.shape[0])

    def aux_loss(self, sae: "SAE", inputs: AuxInputs) -> Tensor:
        """Extra training loss terms (scalar) beyond the reconstruction MSE and the penalty."""
        return inputs.y.new_zeros(())

    def saved_tensors(self) -> dict[str, Tensor]:
        """This architecture's own tensors in the SAE folder, beyond W_enc, b_enc, W_dec, b_dec."""
        return {}

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set the tensors `saved_tensors` names from a folder's (already checked) tensors."""


DECODER_NORMS = ("weighted", "unit")


class _DecoderNormPenalty(Activation):
    """Shared by architectures whose penalty is weighted by decoder-row norms (relu, gated):
    `decoder_norm` "weighted" starts rows at norm 0.1; "unit" keeps them at 1 during training."""

    settings = ("decoder_norm",)
    DECODER_NORMS = DECODER_NORMS

    @classmethod
    def check_options(cls, opts, d_sae: int | None) -> None:
        if opts.decoder_norm not in cls.DECODER_NORMS:
            raise ConfigError(f"decoder_norm must be one of {cls.DECODER_NORMS}, got {opts.decoder_norm!r}")

    @classmethod
    def decoder_init_norm(cls, cfg: "SAEConfig") -> float:
        return 1.0 if cfg.decoder_norm == "unit" else 0.1

    @classmethod
    def unit_norm_decoder(cls, cfg: "SAEConfig") -> bool:
        return cfg.decoder_norm == "unit"


class ReLU(_DecoderNormPenalty):
    """f = relu(z); penalty = sum_i f_i * ||W_dec,i||  (Anthropic, April 2024).

    The penalty is linear in f, so it is computed from f's column sums (no extra pass over f).
    With decoder_norm "unit", rows stay at norm 1 and the penalty is plain L1."""

    name = "relu"
    saelens_name, saelens_transcoder_name = "standard", "transcoder"
    resamples = True
    stackable = True

    def forward(self, z: Tensor) -> Tensor:
        # in place: z is a fresh pre-activation nobody else reads (its GEMM's backward needs only
        # the GEMM's inputs), and a new (N, d_sae) buffer costs more than the relu itself on CPU
        return torch.relu_(z)

    def penalty_column(self, W_dec: Tensor) -> Tensor:
        return W_dec.norm(dim=-1, keepdim=True)  # also (n, d_sae, 1) for stacked W_dec (n, d_sae, d_out)


class _KArch(Activation):
    """Shared by the architectures that keep k features per token (on average for batchtopk):
    k is their setting, and dead features train through the aux-k loss (Gao et al. 2024): the
    top-aux_k dead pre-activations of each token reconstruct the residual y - x_hat,

        aux = aux_coefficient * ||residual - relu(top_aux_k(z_dead)) @ W_dec||^2 / ||residual - mean||^2
    """

    settings = ("k",)
    knob = "k"
    uses_aux_k = True

    def __init__(self, d_sae: int, k: int):
        super().__init__()
        self.k = k

    @classmethod
    def from_config(cls, cfg: "SAEConfig") -> "Activation":
        return cls(cfg.d_sae, cfg.k)

    @classmethod
    def check_options(cls, opts, d_sae: int | None) -> None:
        k = opts.k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (d_sae is not None and k > d_sae):
            bound = f"1 <= k <= d_sae={d_sae}" if d_sae is not None else "k >= 1"
            raise ConfigError(f"arch {opts.arch!r} needs k with {bound}, got k={k!r}")

    def aux_loss(self, sae: "SAE", inputs: AuxInputs) -> Tensor:
        dead = inputs.dead_mask
        if dead is None or not bool(dead.any()):
            return inputs.residual.new_zeros(())
        aux_k = inputs.aux_k or sae.cfg.d_in // 2
        return inputs.aux_coefficient * _aux_k_loss(inputs, dead, aux_k, sae.W_dec)


def _aux_k_loss(inputs: AuxInputs, dead_mask: Tensor, aux_k: int, W_dec: Tensor) -> Tensor:
    """Normalised MSE of the residual's reconstruction by the top-aux_k dead features (through
    the sparse kernels when the step runs on them)."""
    z, residual = inputs.z, inputs.residual
    k = min(aux_k, int(dead_mask.sum()))
    dead_z = torch.where(dead_mask, z, torch.full_like(z, -torch.inf))
    top = torch.topk(dead_z, k, dim=-1, sorted=False)
    if inputs.sampled is not None:
        pattern = SparsePattern.from_rows(top.indices, z.shape[-1])
        r_hat = sparse_decode(torch.relu(inputs.sampled(pattern)), W_dec, pattern)
    else:
        f_aux = torch.zeros_like(z).scatter_(-1, top.indices, torch.relu(top.values))
        r_hat = f_aux @ W_dec
    total = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (residual - r_hat).pow(2).sum(-1).mean() / total


class TopK(_KArch):
    """f keeps the k largest z of each token, relu'd (Gao et al. 2024): f_i = relu(z_i) if z_i is
    among the token's top k, else 0. Its code is natively sparse: (values, indices) (N, k),
    decoded by embedding_bag without a dense (N, d_sae) matrix."""

    name = "topk"
    saelens_name = "topk"  # SAELens has no topk transcoder: saelab writes "topk" with d_out
    per_token_k = True
    sparse_kernels = True
    stackable = True

    def forward(self, z: Tensor) -> Tensor:
        values, indices = self.sparse_code(z)
        return torch.zeros_like(z).scatter_(-1, indices, values)

    def sparse_code(self, z: Tensor, b_enc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The k largest pre-activations per token, relu'd: values and indices, (N, k) each."""
        top = torch.topk(z, self.k, dim=-1, sorted=False)
        return torch.relu(top.values), top.indices

    @torch.no_grad()
    def select(self, z: Tensor) -> SparsePattern:
        """The entries `sparse_code` keeps, as a pattern over (N, d_sae), or over n stacked
        SAEs' (n, N, d_sae)."""
        indices = torch.topk(z, self.k, dim=-1, sorted=False).indices
        return SparsePattern.from_rows(indices, z.shape[-1], blocks=z[..., 0, 0].numel())

    @classmethod
    def saelens_keys(cls, cfg: "SAEConfig") -> dict:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False,
                "activation_fn_str": "topk", "activation_fn_kwargs": {"k": cfg.k}}


class _Threshold(Activation):
    """Shared by architectures with a per-feature inference threshold (d_sae,), saved as
    `threshold` (SAELens's jumprelu layout); subclasses define `threshold` and `set_threshold`."""

    has_threshold = True
    saelens_name, saelens_transcoder_name = "jumprelu", "jumprelu_transcoder"

    def saved_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.set_threshold(tensors["threshold"].float())


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


class JumpReLU(_Threshold):
    """f = relu(z) * H(z - theta); penalty = sum_i H(z_i - theta_i), an L0 (Rajamanoharan et al.
    2024). theta = exp(log_threshold) is learned through straight-through estimators with a
    rectangle kernel K of width `jumprelu_bandwidth` eps:
    d f / d theta = -(theta / eps) K((z - theta) / eps), d H / d theta = -(1 / eps) K(...)."""

    name = "jumprelu"
    settings = ("jumprelu_init_threshold", "jumprelu_bandwidth")

    def __init__(self, d_sae: int, init_threshold: float = 1e-3, bandwidth: float = 1e-3):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @classmethod
    def from_config(cls, cfg: "SAEConfig") -> "Activation":
        return cls(cfg.d_sae, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth)

    @classmethod
    def check_options(cls, opts, d_sae: int | None) -> None:
        for name in cls.settings:
            value = getattr(opts, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def set_threshold(self, threshold: Tensor) -> None:
        with torch.no_grad():
            self.log_threshold.copy_(threshold.clamp_min(1e-12).log())

    def forward(self, z: Tensor) -> Tensor:
        return _JumpReLUFn.apply(z, self.threshold, self.bandwidth)

    def penalty(self, z: Tensor, f: Tensor, W_dec: Tensor) -> Tensor:
        return _StepFn.apply(z, self.threshold, self.bandwidth).sum(-1)


class BatchTopK(_Threshold, _KArch):
    """Training keeps the k*N largest relu(z) over the whole batch of N tokens (Bussmann et al.
    2024) and tracks a threshold theta: the running mean (decay 0.99) of the smallest value kept.
    Inference is f = relu(z) * (z > theta), so it saves as a jumprelu."""

    name = "batchtopk"
    saelens_native = False
    saelens_training_name = "batchtopk"
    sparse_kernels = True

    def __init__(self, d_sae: int, k: int, threshold_decay: float = 0.99):
        super().__init__(d_sae, k)
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
                raise RuntimeError(f"{self.name} SAE has no inference threshold yet: train it, or call .train() to use batch top-k")
            return torch.relu(z) * (z > self._threshold)
        acts = torch.relu(z)
        flat = acts.flatten()
        top = torch.topk(flat, min(self.k * z.shape[0], flat.numel()), sorted=False)
        f = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(z)
        self._update_threshold(top.values.detach())
        return f

    @torch.no_grad()
    def select(self, z: Tensor) -> SparsePattern:
        """The entries `forward` keeps (training: the batch's top k * N, updating the threshold;
        inference: those above the threshold), as a pattern over (N, d_sae)."""
        if not self.training:
            return SparsePattern.from_flat(torch.nonzero(self(z).flatten()).squeeze(1), *z.shape)
        flat = torch.relu(z).flatten()
        top = torch.topk(flat, min(self.k * z.shape[0], flat.numel()), sorted=False)
        self._update_threshold(top.values)
        return SparsePattern.from_flat(top.indices, *z.shape)

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
