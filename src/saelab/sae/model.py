"""The sparse autoencoder: one module for every architecture, and for sparse MLPs (transcoders).

    z     = (x - b_dec · [apply_b_dec_to_input]) @ W_enc + b_enc        (N, d_sae)
    f     = act(z)                                                      (N, d_sae)
    x_hat = f @ W_dec + b_dec                                           (N, d_out)

`x` has shape `(..., d_in)`. A transcoder predicts another activation (`d_out`, `hook_name_out`)
and never subtracts `b_dec` from its input; nothing else differs. The architecture (`act`, its
penalty, its extra loss terms, its policies) is a class from `saelab.sae.architectures`, held as
`sae.activation`. Training loss, per token then averaged:

    loss = ||y - x_hat||^2 + coefficient * penalty(z, f) + aux

where `aux` holds the architecture's extra terms (aux-k over dead features for topk/batchtopk,
gated's frozen-decoder reconstruction, matryoshka's inner prefixes). Weights use the SAELens
layout (`W_enc (d_in, d_sae)`, `W_dec (d_sae, d_out)`); the folder format lives in
`saelab.sae.format`, which reads and writes (SAEConfig, tensors) and never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.errors import ConfigError, CorruptFileError, DataError
from saelab.sae.activations import AuxInputs
from saelab.sae.architectures import architecture
from saelab.sae.config import SAEConfig
from saelab.sae.format import WEIGHTS_FILE, read_sae_folder, write_sae_folder


class ForwardOutput(NamedTuple):
    """Everything one training step needs from an SAE, for a batch of N tokens."""

    x_hat: Tensor  # (N, d_out) reconstruction
    feature_acts: Tensor | None  # (N, d_sae) feature activations f; None where computed sparsely (topk)
    loss: Tensor  # scalar: mse + sparsity + aux
    mse: Tensor  # scalar: mean over tokens of the squared error summed over dimensions
    sparsity: Tensor  # scalar: coefficient * mean penalty (weighted L1 for relu, L0 for jumprelu, ...)
    aux: Tensor  # scalar: the architecture's extra terms (aux-k, gated's aux, matryoshka's prefixes), else 0
    fired: Tensor  # (d_sae,) bool: which features were active on at least one of the N tokens
    l0: Tensor | None  # scalar: mean active features per token (None unless measured, see `loss`)


class SparseCode(NamedTuple):
    """Feature activations as (values, indices), k slots per token; the code of
    `SAE.encode_sparse`, read by `SAE.decode_sparse`. A slot whose value is 0 is unused."""

    values: Tensor  # (N, k) activations (>= 0)
    indices: Tensor  # (N, k) long: the feature each value belongs to


class SAE(nn.Module):
    """A sparse autoencoder or transcoder. See the module docstring for the formula.

    Two ways to build one: `SAE(cfg)` from an SAEConfig, or `SAE(d_in, d_sae, arch=..., **options)`,
    which is `SAE(SAEConfig(d_in, d_sae, arch=..., **options))`."""

    def __init__(self, *args, **options):
        super().__init__()
        if any(isinstance(a, SAEConfig) for a in (*args, *options.values())):
            if len(args) != 1 or options:
                raise TypeError("SAE takes an SAEConfig alone, or d_in, d_sae and options (arch=..., k=...)")
            cfg = args[0]
        else:
            cfg = SAEConfig(*args, **options)
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.activation = architecture(cfg.arch).from_config(cfg)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "SAE":
        return cls(cfg)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tied init: random decoder rows at the architecture's initial norm, W_enc = W_dec^T."""
        nn.init.kaiming_uniform_(self.W_dec)
        norm = self.activation.decoder_init_norm(self.cfg)
        self.W_dec.mul_(norm / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.tie_encoder()
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def tie_encoder(self) -> None:
        """Set W_enc to W_dec^T (where shapes allow: autoencoders, or transcoders with d_in == d_out)."""
        if self.cfg.d_in == self.cfg.d_out:
            self.W_enc.copy_(self.W_dec.T)
        else:
            nn.init.kaiming_uniform_(self.W_enc)

    # ---- the forward pass ------------------------------------------------------------
    @property
    def threshold(self) -> Tensor | None:
        return self.activation.threshold if self.activation.has_threshold else None

    def _check_input(self, x: Tensor, dim: int, what: str) -> None:
        if x.shape[-1] != dim:
            raise DataError(f"{what} has last dimension {x.shape[-1]}, but this SAE expects {dim} (shape {tuple(x.shape)})")

    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x - b_dec) @ W_enc + b_enc, shape (..., d_sae).

        Computed as x @ W_enc + (b_enc - b_dec @ W_enc): the same map, but b_dec's gradient is
        then a vector-matrix product instead of a full (N, d_sae) x (d_sae, d_in) one."""
        self._check_input(x, self.cfg.d_in, "input")
        bias = self.encoder_bias()
        if x.dim() == 2:  # not a view: activations may then work in place on it
            return torch.addmm(bias, x, self.W_enc)  # the bias add fused into the GEMM
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), self.W_enc).view(*x.shape[:-1], self.cfg.d_sae)

    def encoder_bias(self) -> Tensor:
        """(d_sae,) the bias of z = x @ W_enc + bias: b_enc - b_dec @ W_enc (b_dec subtracted from
        the input, as pre_acts explains), or b_enc alone for transcoders."""
        return self.b_enc - self.b_dec @ self.W_enc if self.cfg.apply_b_dec_to_input else self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f, shape (..., d_sae)."""
        z = self.pre_acts(x.reshape(-1, x.shape[-1]))
        return self.activation.features(z, self.b_enc).view(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction f @ W_dec + b_dec, shape (..., d_out)."""
        self._check_input(f, self.cfg.d_sae, "feature activations")
        return f @ self.W_dec + self.b_dec

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """The active features of x (..., d_in), rows flattened to N: (values, indices) (N, k).

        Architectures with a fixed k per token (topk, `per_token_k`) give exactly their k slots and
        never build the dense (N, d_sae) matrix; the others give as many slots as the busiest token
        needs, zero-padded, so `decode_sparse(encode_sparse(x)) == forward(x)` for every architecture."""
        z = self.pre_acts(x.reshape(-1, x.shape[-1]))
        return SparseCode(*self.activation.sparse_code(z, self.b_enc))

    def decode_sparse(self, code: SparseCode) -> Tensor:
        """Reconstruction from (values, indices) (N, k): sum_j values_j W_dec[indices_j] + b_dec,
        (N, d_out), by embedding_bag (no dense (N, d_sae) product)."""
        values, indices = code
        if values.shape != indices.shape or values.dim() != 2:
            raise DataError(f"a sparse code needs values and indices of one (N, k) shape, got "
                            f"{tuple(values.shape)} and {tuple(indices.shape)}")
        # values in W_dec's dtype: under bf16 autocast they come out of a bf16 GEMM, and
        # embedding_bag (which autocast leaves alone) wants one dtype; it then sums in fp32
        weights = values.to(self.W_dec.dtype)
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=weights, mode="sum") + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> x_hat (..., d_out): decode(encode(x))."""
        return self.decode(self.encode(x))

    def loss(
        self,
        x: Tensor,
        target: Tensor | None = None,
        coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        aux_k: int | None = None,
        aux_coefficient: float = 1 / 32,
        measure_l0: bool = True,
    ) -> ForwardOutput:
        """Training loss on a batch x (N, d_in) against target (N, d_out), default x itself.

        `dead_mask` (d_sae,) marks features the trainer considers dead; for the aux-k architectures
        (topk, batchtopk, matryoshka) they reconstruct the residual through their own top-`aux_k`
        pre-activations (Gao et al.). `measure_l0=False` skips counting active features (a full
        pass over f for dense architectures), which a trainer needs only on logging steps."""
        y = x if target is None else target
        self._check_input(y, self.cfg.d_out, "target")
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if self.activation.sparse_kernels:
            from saelab.sae import sparse_step

            if sparse_step.applies(self):
                return sparse_step.sparse_loss(self, x, y, dead_mask, aux_k, aux_coefficient)
        z = self.pre_acts(x)
        if self.activation.per_token_k:
            x_hat, f, sparsity, fired, l0 = self._sparse_step(z)
        else:
            x_hat, f, sparsity, fired, l0 = self._dense_step(z, coefficient, measure_l0)
        err = y - x_hat
        mse = err.pow(2).sum(-1).mean()
        aux = self.activation.aux_loss(self, AuxInputs(z, f, y, err.detach(), dead_mask, aux_k, aux_coefficient))
        return ForwardOutput(x_hat, f, mse + sparsity + aux, mse, sparsity, aux, fired, l0)

    def _sparse_step(self, z: Tensor) -> tuple:
        """Decode through the native sparse code (per_token_k: k slots per token, no penalty):
        x_hat, f (None), sparsity (0), fired, l0."""
        code = SparseCode(*self.activation.sparse_code(z))
        x_hat = self.decode_sparse(code)
        active = code.values.detach() > 0
        fired = torch.bincount(code.indices[active], minlength=self.cfg.d_sae) > 0
        return x_hat, None, z.new_zeros(()), fired, active.sum() / z.shape[0]

    def _dense_step(self, z: Tensor, coefficient: float, measure_l0: bool) -> tuple:
        """Decode the dense f, with the penalty: x_hat, f, sparsity, fired, l0. A penalty linear in f
        (the architecture's penalty_column w, e.g. relu's decoder norms) is taken from f's column
        sums s, which `fired` needs anyway: mean_n f_n . w = (s . w) / N. Its gradient w / N is then
        one broadcast add to f's, and the decoder GEMM keeps its d_out columns (an extra output
        column for the penalty makes every product with W_dec an odd, slower shape)."""
        act, sparsity = self.activation, z.new_zeros(())
        f = act.features(z, self.b_enc)
        x_hat = torch.addmm(self.b_dec, f, self.W_dec)  # the bias add fused into the GEMM
        sums = f.sum(0)
        if coefficient:
            mean = act.penalty_from_sums(sums, self.W_dec, z.shape[0])
            sparsity = coefficient * (mean if mean is not None else act.penalty(z, f, self.W_dec).mean())
        with torch.no_grad():  # f >= 0, so a feature fired iff its column sum is positive
            fired = sums.detach() > 0
            l0 = torch.count_nonzero(f) / z.shape[0] if measure_l0 else None
        return x_hat, f, sparsity, fired, l0

    # ---- decoder-norm constraint (the architecture's unit_norm_decoder) ----------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the part of W_dec's gradient along each row, so a step keeps rows unit-norm
        to first order (renormalising afterwards removes the rest)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)

    # ---- initialisation from data -------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor, b_dec: str = "mean", decoder: bool = False, generator=None) -> None:
        """Data-aware init. `b_dec`: "mean", "geometric_median" or "zeros" of the sample x (N, d_in);
        a transcoder's b_dec is an output bias, so it stays 0 whatever `b_dec` says (this is the
        one place that rule lives). `decoder=True` (autoencoders only): decoder rows are random
        samples of x (centred by b_dec, unit-norm, scaled like the default init), W_enc tied to them."""
        if not torch.isfinite(x).all():
            raise DataError("initialisation sample contains NaN or Inf")
        if b_dec not in ("mean", "geometric_median", "zeros"):
            raise ConfigError(f"b_dec init must be 'mean', 'geometric_median' or 'zeros', got {b_dec!r}")
        self._check_input(x, self.cfg.d_in, "initialisation sample")
        if not self.cfg.is_transcoder and b_dec != "zeros":
            centre = x.mean(0) if b_dec == "mean" else geometric_median(x)
            self.b_dec.copy_(centre.to(self.b_dec))
        if decoder:
            if self.cfg.is_transcoder:
                raise ConfigError("data-sample decoder init needs an autoencoder (d_out == d_in)")
            idx = torch.randint(0, x.shape[0], (self.cfg.d_sae,), generator=generator)
            rows = x[idx] - self.b_dec
            norm = self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8) * norm)
            self.tie_encoder()

    # ---- input scaling ---------------------------------------------------------------
    @torch.no_grad()
    def fold_scaling(self, scale_in: float, scale_out: float | None = None) -> None:
        """An SAE trained on (scale_in * x -> scale_out * y) becomes one on raw (x -> y).

        z = (s x - b) W + c = (x - b/s)(s W) + c, so W_enc *= s_in; the output divides by s_out.
        Pre-activations (and so thresholds) are unchanged."""
        scale_out = scale_in if scale_out is None else scale_out
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)

    # ---- persistence -----------------------------------------------------------------
    def saved_tensors(self) -> dict[str, Tensor]:
        """The SAE folder's tensors by their saved names: W_enc, b_enc, W_dec, b_dec (an
        architecture may save one under another name: gated's b_enc is b_gate) and the
        architecture's own (a threshold; gated's b_mag and r_mag)."""
        names = self.activation.saved_names
        core = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {names.get(k, k): v for k, v in core.items()} | self.activation.saved_tensors()

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], where: str | Path = "the tensors") -> None:
        """Set every parameter from `tensors` (saved names, as `saved_tensors` gives them),
        checking each name and shape; extra tensors are ignored."""
        for name, param in self.saved_tensors().items():
            if name not in tensors:
                raise CorruptFileError(f"{where} has no tensor {name!r}; it has {sorted(tensors)}")
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CorruptFileError(
                    f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {tuple(param.shape)}"
                )
        names = self.activation.saved_names
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(tensors[names.get(name, name)].float())
        self.activation.load_saved_tensors(tensors)

    def save(self, path: str | Path) -> Path:
        """Write the SAE folder (cfg.json + sae_weights.safetensors, SAELens-compatible)."""
        return write_sae_folder(path, self.cfg, self.saved_tensors())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", *, allow_nonfinite: bool = False) -> "SAE":
        """Load a saelab or SAELens SAE folder. Weights holding NaN or Inf are refused (naming
        the tensor) unless `allow_nonfinite`, for debugging a broken SAE."""
        cfg, tensors = read_sae_folder(path, allow_nonfinite=allow_nonfinite)
        sae = cls(cfg)
        sae.load_tensors(tensors, Path(path) / WEIGHTS_FILE)
        return sae.to(device)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return f"arch={c.arch}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}{k}"


def load_sae(path: str | Path, device: str | torch.device = "cpu", *, allow_nonfinite: bool = False) -> SAE:
    """Load a saelab or SAELens SAE folder (SAE.load)."""
    return SAE.load(path, device, allow_nonfinite=allow_nonfinite)


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write an SAE folder (SAE.save)."""
    return sae.save(path)


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x."""
    x = x.double()
    point = x.mean(0)
    for _ in range(iters):
        dist = (x - point).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - point).norm() <= tol * max(1.0, point.norm().item()):
            point = new
            break
        point = new
    return point.float()
