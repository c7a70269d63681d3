"""Prune high-frequency features to a target L0 and recompute the SAE's statistics (seed 000).

The researchers' experiment: "I killed all features of frequency larger than 0.038. This was
2041 features, and resulted in a L0 just below 40", then compared MSE and % loss recovered with
an SAE trained to that L0 by a larger L1 penalty. Since L0 = sum of feature densities, killing
features in order of decreasing density lowers L0 by exactly each one's density (on the tokens
the densities were measured on): the cut-off is found in closed form, then measured again on
the evaluation tokens.

A killed feature has its encoder column, encoder bias and decoder row set to zero, so it never
fires and the pruned SAE saves and loads like any other. Features of relu, jumprelu and
batchtopk SAEs (at inference) fire independently, so the others are untouched. A topk SAE is
refused: killing a feature frees its slot for the next one, so L0 would not fall (train with a
smaller k instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.sae.architectures import names_where


@dataclass
class PrunePlan:
    target_l0: float
    killed: torch.Tensor  # (n_killed,) feature indices, most frequent first
    cutoff: float  # every feature with density > cutoff is killed
    expected_l0: float  # sum of the remaining densities

    def to_dict(self) -> dict:
        return {"target_l0": self.target_l0, "n_killed": int(self.killed.numel()), "density_cutoff": self.cutoff, "expected_l0": self.expected_l0}


def plan_pruning(density: torch.Tensor, target_l0: float) -> PrunePlan:
    """The fewest most-frequent features to kill so that sum(remaining density) < target_l0.

    Features of equal density are killed together (a density cut-off, as in the seed)."""
    if target_l0 <= 0:
        raise ConfigError(f"target L0 must be positive, got {target_l0}")
    density = density.double()
    order = torch.argsort(density, descending=True, stable=True)
    sorted_d = density[order]
    remaining = density.sum() - torch.cumsum(sorted_d, 0)  # L0 after killing the first i+1
    if float(density.sum()) < target_l0:
        return PrunePlan(target_l0, order[:0], float(sorted_d[0]) if len(sorted_d) else 0.0, float(density.sum()))
    n = int(torch.nonzero(remaining < target_l0)[0]) + 1
    while 0 < n < len(sorted_d) and sorted_d[n] == sorted_d[n - 1]:
        n += 1  # a tie at the boundary: kill all equal features, so the rule is "density > cutoff"
    cutoff = float(sorted_d[n]) if n < len(sorted_d) else 0.0
    return PrunePlan(target_l0, order[:n], cutoff, float(sorted_d[n:].sum()))


@torch.no_grad()
def prune_features(sae: SAE, killed: torch.Tensor) -> SAE:
    """A copy of `sae` in which the `killed` features never fire and write nothing."""
    if sae.activation.per_token_k:
        raise ConfigError(f"pruning a {sae.cfg.arch} SAE frees each killed feature's slot for another feature, so L0 "
                          f"does not fall; prune {names_where(lambda c: not c.per_token_k)} SAEs, or train with a smaller k")
    out = copy.deepcopy(sae)
    if killed.numel():
        if int(killed.max()) >= sae.cfg.d_sae or int(killed.min()) < 0:
            raise ConfigError(f"feature indices must be in 0..{sae.cfg.d_sae - 1}")
        out.W_enc[:, killed] = 0.0
        out.b_enc[killed] = 0.0
        out.W_dec[killed] = 0.0
    out.cfg = copy.deepcopy(sae.cfg)
    out.cfg.metadata = {**sae.cfg.metadata, "pruned_features": int(killed.numel())}
    return out
