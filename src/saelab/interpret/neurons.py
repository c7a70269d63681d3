"""A layer's MLP neurons as a dictionary, so that the feature report, its dashboard and its counts
read neurons exactly as they read an SAE's features (seed 004 compares the two).

The identity dictionary of layer L reads `blocks.L.mlp.hook_post` (the MLP's hidden activations,
the input of its output projection) and writes `blocks.L.hook_mlp_out`:

    f     = relu(a)              encoder: the identity (W_enc = I, b_enc = 0), then relu
    x_hat = f @ W_out + b_out    decoder rows: the neurons' output weights

so feature i is neuron i, and its decoder row is the direction it writes into the residual
stream, which the logit lens reads directly. A neuron is *active* where its hidden activation is
> 0, as the notes count a neuron firing: GELU and SiLU neurons also go slightly negative, and a
gated MLP's hidden value act(gate) * up is negative about as often as positive; the report sees
negative values as 0 (not active), so density, examples, quantiles and token counts all count
the positive side. With `sign=-1` the dictionary reads the negative side instead (f = relu(-a),
decoder rows -W_out). x_hat equals the MLP output only where no neuron is on the other side; the
report never splices it in.
"""

from __future__ import annotations

import torch

from saelab.errors import ConfigError
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

ARCH_LABEL = "mlp neurons"  # what a neuron report's header shows as the dictionary's architecture
SIGNS = (1, -1)


def neuron_hooks(layer: int) -> tuple[str, str]:
    """(hook read, hook written) of layer `layer`'s neurons."""
    return f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"


@torch.no_grad()
def neuron_dictionary(lm: HookedLM, layer: int, sign: int = 1) -> SAE:
    """The identity dictionary of layer `layer`'s MLP neurons (module docstring), in float32 on
    the LM's device, in eval mode."""
    if not 0 <= layer < lm.n_layers:
        raise ConfigError(f"layer must be in 0..{lm.n_layers - 1}, got {layer}")
    if sign not in SIGNS:
        raise ConfigError(f"sign must be 1 (the positive side) or -1 (the negative side), got {sign}")
    weights = lm.mlp_weights(layer)
    d_mlp, d_model = weights.W_out.shape
    hook_in, hook_out = neuron_hooks(layer)
    sae = SAE(d_mlp, d_mlp, d_out=d_model, arch="relu", hook_name=hook_in, hook_name_out=hook_out,
              model_name=lm.name or None, metadata={"neurons": {"layer": layer, "sign": sign}})
    sae.W_enc.copy_(sign * torch.eye(d_mlp))
    sae.b_enc.zero_()
    sae.W_dec.copy_(sign * weights.W_out.detach().float())
    sae.b_dec.copy_(weights.b_out.detach().float() if weights.b_out is not None else torch.zeros(d_model))
    return sae.to(lm.device).eval()
