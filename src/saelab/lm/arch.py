"""Where each hook point lives inside a Hugging Face causal LM, per architecture family.

Supporting a new family is one `Arch` row in `ARCHS`: module paths only, no code. The hook
layer (`saelab.lm.hooked`) turns a row into TransformerLens-named hook points; nothing else in
saelab needs to know which family a model belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from saelab.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture family.

    Paths marked "block" are relative to one transformer block; the others are relative to
    the `*ForCausalLM` root module."""

    blocks: str  # the ModuleList of blocks
    embed: str  # token embedding
    final_norm: str  # layer norm before the unembedding
    attn: str  # block: attention; its output (element 0) is hook_attn_out
    mlp: str  # block: MLP; its input is ln2.hook_normalized, its output hook_mlp_out
    ln2: str  # block: pre-MLP norm; its input is hook_resid_mid (sequential blocks)
    mlp_in: str  # block: projection whose output is mlp.hook_pre (the gate for gated MLPs)
    mlp_out: str  # block: output projection; its input is mlp.hook_post
    mlp_up: str | None = None  # block: gated MLPs only, the non-gated input projection
    pos_embed: str | None = None  # learned absolute position embedding, if any
    parallel_flag: str | None = None  # config attribute that makes blocks parallel-residual


_LLAMA = Arch(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    mlp="mlp",
    ln2="post_attention_layernorm",
    mlp_in="mlp.gate_proj",
    mlp_out="mlp.down_proj",
    mlp_up="mlp.up_proj",
)

ARCHS: dict[str, Arch] = {
    "gpt_neox": Arch(
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        mlp="mlp",
        ln2="post_attention_layernorm",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        parallel_flag="use_parallel_residual",
    ),
    "gpt2": Arch(
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        mlp="mlp",
        ln2="ln_2",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        pos_embed="transformer.wpe",
    ),
    # Llama-style blocks: same module names, RMSNorm, gated MLP.
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def arch_for(model_type: str) -> Arch:
    """The `Arch` row for a config's `model_type`; ConfigError naming the supported ones."""
    if model_type not in ARCHS:
        raise ConfigError(
            f"model type {model_type!r} is not supported by saelab's hook layer; "
            f"supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def is_parallel(arch: Arch, config) -> bool:
    """True when attention and MLP both read resid_pre (GPT-NeoX/Pythia default)."""
    return bool(arch.parallel_flag and getattr(config, arch.parallel_flag, False))


class MLPWeights(NamedTuple):
    """One MLP's weights in TransformerLens orientation (input dimension first).

    W_in (d_model, d_mlp), b_in (d_mlp,) | None: produce mlp.hook_pre (the gate when gated);
    W_out (d_mlp, d_model), b_out (d_model,) | None: read mlp.hook_post;
    W_up (d_model, d_mlp) | None: gated MLPs' linear branch (TransformerLens `W_in` there)."""

    W_in: torch.Tensor
    b_in: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    W_up: torch.Tensor | None = None


def in_out_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (in, out), b (out,) | None) of a linear layer, whether nn.Linear (weight stored
    (out, in)) or GPT-2's Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight.T, module.bias
    if hasattr(module, "nf") and module.weight.shape[1] == module.nf:  # transformers Conv1D
        return module.weight, module.bias
    raise ConfigError(f"cannot read weights of {type(module).__name__}: expected a linear layer")
