"""A language model with its attention patterns and normalisation scales frozen.

Inside `frozen(lm)` every LayerNorm / RMSNorm divides by the scale it computed on the first
("recording") pass, and every attention layer uses the pattern it computed there, for as many
later ("replay") passes as the caller runs. With those held fixed the residual stream is an
affine function of what is written into it (token embeddings, MLP outputs), which is what makes
attribution-graph edges exact: an edge is a derivative of that affine map, so it equals the
effect of ablating its source in the frozen model (`saelab.experiments.graph`).

Norms are found by type (nn.LayerNorm, or a module named *RMSNorm with `weight` and an epsilon,
as in Llama / Mistral / Qwen2); attention goes through transformers' AttentionInterface under
its own name, with the matching eager mask, so every family `saelab.lm.arch` supports (GPT-NeoX,
GPT-2, Llama-style with grouped-query attention) is covered without touching their code. The
recording pass computes the same numbers as the eager implementation, and is the model's
ordinary forward (up to float rounding against a fused kernel).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from saelab.errors import ConfigError
from saelab.lm.hooked import HookedLM

_NAME = "saelab_frozen"


class FrozenState:
    """The recorded scales (per norm module) and patterns (per attention module); `recording`
    is True until `replay()` is called, after which every pass reuses them."""

    def __init__(self) -> None:
        self.scales: dict[int, torch.Tensor] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        self.recording = True

    def replay(self) -> None:
        if not self.scales or not self.patterns:
            raise ConfigError("nothing recorded: run one forward pass inside frozen() before replay()")
        self.recording = False

    def lookup(self, table: dict, key: int, what: str, shape) -> torch.Tensor:
        """The recorded tensor of one module, checked to fit a replayed input of `shape`."""
        value = table.get(key)
        if value is None or value.shape[-2] != shape[-2] or value.shape[0] != shape[0]:
            raise ConfigError(f"the replayed pass does not match the recorded one ({what} of shape "
                              f"{None if value is None else tuple(value.shape)} for input {tuple(shape)}): "
                              "replay the same batch and sequence length")
        return value


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight"):
        return "rms"
    return None


def _norm_hook(state: FrozenState, kind: str):
    """Forward hook: recompute the norm's output with the recorded scale (recording it first)."""
    def hook(module, args, output):
        x = args[0]
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
        if state.recording:
            wide = centred.to(torch.promote_types(x.dtype, torch.float32))
            state.scales[id(module)] = (wide.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
            scale = state.scales[id(module)]
        else:
            scale = state.lookup(state.scales, id(module), "norm scale", x.shape)
        y = (centred / scale).to(x.dtype)
        y = y * module.weight if getattr(module, "weight", None) is not None else y
        return y + module.bias if getattr(module, "bias", None) is not None else y
    return hook


def _attention(state: FrozenState):
    """An attention function (AttentionInterface signature) that records or replays the pattern."""
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        n_rep = query.shape[1] // key.shape[1]  # grouped-query attention: kv heads shared
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
        if state.recording:
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
            if attention_mask is not None:
                scores = scores + attention_mask[..., : key.shape[-2]]
            wide = torch.promote_types(scores.dtype, torch.float32)
            pattern = torch.softmax(scores, dim=-1, dtype=wide).to(query.dtype).detach()
            state.patterns[id(module)] = pattern
        else:
            pattern = state.lookup(state.patterns, id(module), "attention pattern", query.shape)
        return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern
    return attend


@contextmanager
def frozen(lm: HookedLM) -> Iterator[FrozenState]:
    """Run `lm` with frozen norms and attention inside the block: the first pass records, and
    after `state.replay()` every pass reuses what it recorded. Restores the model on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    state = FrozenState()
    AttentionInterface.register(_NAME, _attention(state))
    ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, eager_mask)
    norms = [(m, k) for m in lm.model.modules() if (k := _norm_kind(m))]
    if not norms:
        raise ConfigError(f"no LayerNorm or RMSNorm found in {lm.name or 'the model'}: cannot freeze its scales")
    configs = {id(c): c for c in _configs(lm.model)}.values()
    before = [(c, c._attn_implementation) for c in configs]
    handles = [m.register_forward_hook(_norm_hook(state, k)) for m, k in norms]
    try:
        for c, _ in before:
            c._attn_implementation = _NAME
        yield state
    finally:
        for handle in handles:
            handle.remove()
        for c, impl in before:
            c._attn_implementation = impl


def _configs(model: nn.Module) -> list:
    """Every config object the model's modules read `_attn_implementation` from."""
    return [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
