"""Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; Nabeshima 2024): one class, a BatchTopK with nested reconstruction losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from saelab.errors import ConfigError
from saelab.sae.activations import AuxInputs, BatchTopK

if TYPE_CHECKING:
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

DEFAULT_LEVELS = 5  # default prefixes: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae


def resolve_prefixes(prefixes: list[int] | None, d_sae: int) -> tuple[int, ...]:
    """The nested dictionary sizes, ending at d_sae (appended if the list stops short of it).
    None: halve d_sae DEFAULT_LEVELS - 1 times (group sizes double towards the end)."""
    if prefixes is None:
        return tuple(sorted({d_sae >> j for j in range(DEFAULT_LEVELS)} - {0}))
    return tuple(prefixes) if prefixes[-1] == d_sae else (*prefixes, d_sae)


class MatryoshkaBatchTopK(BatchTopK):
    """f is the batchtopk code of the whole dictionary; training also asks every prefix of the
    dictionary, of sizes m_1 < ... < m_L = d_sae, to reconstruct on its own:

        loss = sum_l ||y - (f[:, :m_l] @ W_dec[:m_l] + b_dec)||^2   (+ aux-k over dead features)

    so the first features learn general directions and later ones refine them. The l = L term is
    the SAE's usual MSE; the inner prefixes are in its aux term. Inference is batchtopk's
    threshold, so it saves to SAELens as a jumprelu (as SAELens does), with saelab's config under
    metadata.saelab so saelab reloads it as matryoshka."""

    name = "matryoshka_batchtopk"
    settings = ("k", "matryoshka_prefixes")
    saelens_training_name = "matryoshka_batchtopk"
    sparse_kernels = False  # the inner prefixes' losses read the dense f

    def __init__(self, d_sae: int, k: int, prefixes: tuple[int, ...]):
        super().__init__(d_sae, k)
        self.prefixes = prefixes

    @classmethod
    def from_config(cls, cfg: "SAEConfig") -> "MatryoshkaBatchTopK":
        return cls(cfg.d_sae, cfg.k, resolve_prefixes(cfg.matryoshka_prefixes, cfg.d_sae))

    @classmethod
    def check_options(cls, opts, d_sae: int | None) -> None:
        super().check_options(opts, d_sae)
        prefixes = opts.matryoshka_prefixes
        if prefixes is None:
            return
        ints = isinstance(prefixes, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in prefixes)
        if not ints or not prefixes or prefixes[0] < 1 or any(a >= b for a, b in zip(prefixes, prefixes[1:])):
            raise ConfigError(f"matryoshka_prefixes must be strictly increasing positive integers, got {prefixes!r}")
        if d_sae is not None and prefixes[-1] > d_sae:
            raise ConfigError(f"matryoshka_prefixes must end at or below d_sae={d_sae}, got {prefixes!r}")

    def aux_loss(self, sae: "SAE", inputs: AuxInputs) -> Tensor:
        return super().aux_loss(sae, inputs) + self.inner_prefix_loss(inputs.f, inputs.y, sae.W_dec, sae.b_dec)

    def inner_prefix_loss(self, f: Tensor, y: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        """sum over the prefixes m_l < d_sae of ||y - (f[:, :m_l] @ W_dec[:m_l] + b_dec)||^2, mean
        over tokens; the prefixes' reconstructions are built group by group (one GEMM in all)."""
        loss, x_hat, start = y.new_zeros(()), b_dec, 0
        for end in self.prefixes[:-1]:
            x_hat = x_hat + f[:, start:end] @ W_dec[start:end]
            loss = loss + (y - x_hat).pow(2).sum(-1).mean()
            start = end
        return loss
