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

Shared prefixes: with `max_back` only tokens first = p - max_back .. p - 1 are removed, so all
rows of an example begin with the same tokens 0..first - 1. Those are run once per example (one
forward for a group of examples with the same `first`) and their attention keys and values
reused by every row, which then runs only its last max_back + 1 tokens: the cost per example
falls from (max_back + 1) * p tokens to about p + (max_back + 1)^2.
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
    reads = [torch.tensor([r.pos] + [r.pos - 1] * (len(x) - 1)) - f for r, x, f in zip(requests, rows, firsts)]
    values = [torch.empty(len(x)) for x in rows]
    order = sorted(range(len(requests)), key=lambda i: (firsts[i], requests[i].pos))
    for chunk in _chunks(order, firsts, [len(x) for x in rows], max_rows):
        first = firsts[chunk[0][0]]  # the same for the whole chunk: the rows' shared prefix
        past = None
        if first:  # each request's prefix once, then one copy of its keys/values per row
            owners = {i: n for n, i in enumerate(dict.fromkeys(i for i, _, _ in chunk))}
            past = _prefix_cache(lm, hook, torch.stack([prefixes[i][:first] for i in owners]))
            past.batch_select_indices(torch.cat([torch.full((hi - lo,), owners[i]) for i, lo, hi in chunk]))
        tails = [rows[i][lo:hi, first:] for i, lo, hi in chunk]
        length = max(t.shape[1] for t in tails)
        batch = torch.cat([torch.cat([t, t[:, -1:].expand(-1, length - t.shape[1])], 1) for t in tails])
        acts = lm.run_with_cache(batch, [hook], past=past)[hook]
        read = torch.cat([reads[i][lo:hi] for i, lo, hi in chunk])
        feats = torch.cat([torch.full((hi - lo,), requests[i].feature) for i, lo, hi in chunk])
        f = sae.encode(acts[torch.arange(len(read)), read].to(sae.W_enc.device, sae.W_enc.dtype))
        flat = f[torch.arange(len(read)), feats.to(f.device)].float().cpu()
        for (i, lo, hi), part in zip(chunk, flat.split([hi - lo for _, lo, hi in chunk])):
            values[i][lo:hi] = part
    return [_result(r, f, v) for r, f, v in zip(requests, firsts, values)]


def _chunks(order: list[int], firsts: list[int], counts: list[int], max_rows: int):
    """Forwards as lists of (request, lo, hi) row ranges: at most max_rows rows each (a request
    with more rows is split), all with the same `first`, so they share one prefix length."""
    chunk, used = [], 0
    for i in order:
        lo = 0
        while lo < counts[i]:
            if chunk and (firsts[i] != firsts[chunk[0][0]] or used == max_rows):
                yield chunk
                chunk, used = [], 0
            hi = min(counts[i], lo + max_rows - used)
            chunk.append((i, lo, hi))
            used, lo = used + hi - lo, hi
    if chunk:
        yield chunk


def _prefix_cache(lm, hook: str, prefixes: Tensor):
    """Attention keys and values of the prefixes (c, first), up to the hook's layer."""
    past = lm.new_kv_cache()
    lm.run_with_cache(prefixes, [hook], past=past)
    return past


def _result(req: AblationRequest, first: int, values: Tensor) -> AblationResult:
    """values: the base activation, then one per removed token first..pos-1."""
    ablated = torch.full((req.pos + 1,), float("nan"))
    ablated[first:req.pos] = values[1:]
    return AblationResult(float(values[0]), ablated)
