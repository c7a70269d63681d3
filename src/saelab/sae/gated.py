"""The gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): one class, plugged into the SAE like any other architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saelab.sae.activations import AuxInputs, _DecoderNormPenalty

if TYPE_CHECKING:
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE


class Gated(_DecoderNormPenalty):
    """A gate decides which features fire and a magnitude path how strongly; they share W_enc.
    The SAE's b_enc is the gate bias b_gate, so z = pi_gate:

        pi_gate = (x - b_dec) W_enc + b_gate                      (= z)
        pi_mag  = (x - b_dec)(W_enc * exp(r_mag)) + b_mag          = (z - b_gate) * exp(r_mag) + b_mag
        f       = 1[pi_gate > 0] * relu(pi_mag)
        penalty = sum_i relu(pi_gate_i) * ||W_dec,i||
        aux     = ||y - (relu(pi_gate) @ sg(W_dec) + sg(b_dec))||^2      (sg: no gradient)

    The step 1[.] passes no gradient: the reconstruction trains the magnitude path, and the
    penalty and aux train the gate through relu(pi_gate), aux through a frozen decoder. Saved as
    SAELens's "gated" (b_enc under the name b_gate, plus b_mag and r_mag); SAELens has no gated
    transcoder, so a gated transcoder folder (architecture "gated" with d_out) is saelab-only.
    """

    name = "gated"
    saelens_name = "gated"
    saved_names = {"b_enc": "b_gate"}

    def __init__(self, d_sae: int):
        super().__init__()
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    @classmethod
    def from_config(cls, cfg: "SAEConfig") -> "Gated":
        return cls(cfg.d_sae)

    def forward(self, z: Tensor, b_gate: Tensor) -> Tensor:
        magnitude = torch.relu((z - b_gate) * self.r_mag.exp() + self.b_mag)
        return magnitude * (z > 0)

    def features(self, z: Tensor, b_enc: Tensor) -> Tensor:
        return self(z, b_enc)

    def penalty(self, z: Tensor, f: Tensor, W_dec: Tensor) -> Tensor:
        return torch.relu(z) @ W_dec.norm(dim=1)

    def aux_loss(self, sae: "SAE", inputs: AuxInputs) -> Tensor:
        via_gate = torch.relu(inputs.z) @ sae.W_dec.detach() + sae.b_dec.detach()
        return (inputs.y - via_gate).pow(2).sum(-1).mean()

    def saved_tensors(self) -> dict[str, Tensor]:
        return {"b_mag": self.b_mag, "r_mag": self.r_mag}

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.b_mag.copy_(tensors["b_mag"].float())
            self.r_mag.copy_(tensors["r_mag"].float())
