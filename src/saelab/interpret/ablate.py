"""Ablated text: how much a feature's activation at one position depends on each earlier token.

For a context, a position p and a feature: drop token t (t < p) from the context, so the text
closes up and the feature's token moves to p - 1, and read the feature there. Removing a token
(rather than replacing it) keeps every remaining token real text. The delta against the
unablated activation shows which earlier tokens the feature reads; single removals miss
redundancy (A or B ... C), which is why this is evidence, not proof.

Batching: the model is causal, so an activation at position q depends only on tokens 0..q and
any tokens after q can be padding. Every row (the base prefix of length p + 1 and each ablated
prefix of length p, right-padded) is therefore one row of a rectangular batch; rows of several
examples share forwards, sorted by length so that padding stays small.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from saelab.errors import ConfigError, DataError


class AblationRequest(NamedTuple):
    tokens: Tensor  # (S,) token ids of the context
    pos: int  # position whose activation is read
    feature: int


class AblationResult(NamedTuple):
    base: float  # activation at `pos` with nothing removed
    ablated: Tensor  # (pos + 1,) activation with token t removed; NaN at t = pos and t not tried

    def delta(self) -> list[float | None]:
        """ablated - base per token, None where not computed (the schema's `delta`)."""
        return [None if math.isnan(a) else a - self.base for a in self.ablated.tolist()]


def _check(req: AblationRequest, d_sae: int) -> Tensor:
    tokens = torch.as_tensor(req.tokens).long().flatten()
    if tokens.numel() == 0:
        raise DataError("ablation needs a non-empty context")
    if not 0 <= req.pos < tokens.numel():
        raise DataError(f"position {req.pos} is out of range for a context of {tokens.numel()} "
                        f"tokens (valid: 0..{tokens.numel() - 1})")
    if not 0 <= req.feature < d_sae:
        raise ConfigError(f"feature {req.feature} is out of range (valid: 0..{d_sae - 1})")
    return tokens[:req.pos + 1]


def _rows(prefix: Tensor, first: int) -> Tensor:
    """(1 + p - first, p + 1): the prefix, then the prefix without token t for t in first..p-1,
    each right-padded with its own last token."""
    p = prefix.numel() - 1
    t = torch.arange(first, p)[:, None]
    j = torch.arange(p + 1)[None]
    idx = (j + (j >= t).long()).clamp(max=p)  # skip t; the final column repeats the last token
    return torch.cat([prefix[None], prefix[idx]])


@torch.no_grad()
def ablate_tokens(lm, sae, requests: Sequence[AblationRequest], *, max_back: int | None = None,
                  max_rows: int = 256) -> list[AblationResult]:
    """One AblationResult per request. `max_back`: only remove the `max_back` tokens before
    `pos` (None: all of them). At most `max_rows` sequences per forward."""
    hook = sae.cfg.hook_name
    if hook is None:
        raise ConfigError("the SAE has no hook_name: cannot tell where to read its input")
    prefixes = [_check(r, sae.cfg.d_sae) for r in requests]
    firsts = [0 if max_back is None else max(0, r.pos - max_back) for r in requests]
    rows = [_rows(p, f) for p, f in zip(prefixes, firsts)]
    read = [torch.cat([torch.tensor([r.pos]), torch.full((len(x) - 1,), r.pos - 1)])
            for r, x in zip(requests, rows)]
    owner = [torch.full((len(x),), i) for i, x in enumerate(rows)]
    order = sorted(range(len(requests)), key=lambda i: requests[i].pos)
    flat = [(x, int(q), int(o)) for i in order for x, q, o in zip(rows[i], read[i], owner[i])]
    values = torch.empty(len(flat))
    for start in range(0, len(flat), max_rows):
        chunk = flat[start:start + max_rows]
        length = max(x.numel() for x, _, _ in chunk)
        batch = torch.stack([torch.cat([x, x[-1:].expand(length - x.numel())]) for x, _, _ in chunk])
        acts = lm.run_with_cache(batch, [hook])[hook]
        at = acts[torch.arange(len(chunk)), torch.tensor([q for _, q, _ in chunk])]
        feats = torch.tensor([requests[o].feature for _, _, o in chunk])
        f = sae.encode(at.to(sae.W_enc.device, sae.W_enc.dtype))
        values[start:start + len(chunk)] = f[torch.arange(len(chunk)), feats.to(f.device)].float().cpu()
    return _collect(requests, firsts, order, values)


def _collect(requests, firsts, order, values: Tensor) -> list[AblationResult]:
    """Split the flat activations (in `order`) back into one result per request."""
    out: list[AblationResult | None] = [None] * len(requests)
    offset = 0
    for i in order:
        p, first = requests[i].pos, firsts[i]
        n = 1 + p - first
        base, abl = values[offset], values[offset + 1:offset + n]
        ablated = torch.full((p + 1,), float("nan"))
        ablated[first:p] = abl
        out[i] = AblationResult(float(base), ablated)
        offset += n
    return out
