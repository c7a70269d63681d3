"""Where the feature scan's contexts and activations come from, and the per-token activations of
the examples it keeps.

Batches are whole contexts: a tensor of token ids, or a `ContextBatch` carrying the rows of the
token array they are and, optionally, precomputed hook activations. A `ContextSource` gives both
the scan's batches and the example fetcher (`encode_rows`, read by `example_acts`), so the two
read the same activations: live (the LM), from an activation cache (`cache_source`: the cache's
contexts, its stored activations, its BOS position skipped), or from batches a caller computed.
Positions the scan skips (before `start`: the BOS position; rows an outlier rule flags,
`ContextSource.outliers`) read as NaN in examples: not scanned, so no activation to show.
The scan itself (what is kept per feature) is interpret/scan.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.data.cache.read import ActivationCache, open_cache
from saelab.data.outliers import OutlierRule
from saelab.errors import ConfigError, DataError
from saelab.evals.finite import refuse_nonfinite


class ContextBatch(NamedTuple):
    tokens: Tensor  # (B, S) token ids of whole contexts
    rows: Tensor | None = None  # (B,) rows of the token array; default: counted from 0
    acts: Tensor | None = None  # (B, S - start, d_in) hook activations; default: run the LM
    # first position scanned (1 for a cache that dropped BOS): earlier tokens are context only,
    # and positions still count from the context's start
    start: int = 0

    def scanned_from(self, start: int) -> "ContextBatch":
        """This batch scanned from position `start` on (when it starts earlier): its activations
        of the earlier positions dropped, so a caller's batches follow their source's `start`."""
        if self.start >= start:
            return self
        acts = None if self.acts is None else self.acts[:, start - self.start:]
        return self._replace(acts=acts, start=start)


def context_batches(contexts: Tensor, batch_size: int = 16) -> Iterator[ContextBatch]:
    """Batches of rows of a token array (n, S), with their row numbers."""
    for start in range(0, contexts.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, contexts.shape[0]))
        yield ContextBatch(contexts[start:start + batch_size], rows)


# ---- activations -----------------------------------------------------------------------------
class ActiveFeatures(NamedTuple):
    tok_i: Tensor  # (n,) token index in the batch, row-major
    feat: Tensor  # (n,) feature index
    value: Tensor  # (n,) activation


def nonzero_acts(f: Tensor) -> ActiveFeatures:
    """The active entries of dense feature activations f (N, d_sae): the only pass over f."""
    tok_i, feat = torch.nonzero(f, as_tuple=True)
    return ActiveFeatures(tok_i, feat, f[tok_i, feat])


def hook_acts(sae, lm=None, tokens: Tensor | None = None, acts: Tensor | None = None,
              start: int = 0, rows: Tensor | None = None) -> Tensor:
    """Activations at the SAE's hook (B, S - start, d_in) of context positions start..: `acts`
    if given (those positions only), else the LM's for the whole contexts `tokens` (the LM
    sees every position; the pass stops at that hook); on the SAE's device. Non-finite ones
    are refused, naming the context (its index in `rows`, the contexts' numbers) and position."""
    if acts is None:
        if lm is None:
            raise ConfigError("no activations given and no LM to compute them from")
        hook = sae.cfg.hook_name
        acts = lm.run_with_cache(tokens, [hook])[hook][:, start:]
    refuse_nonfinite(acts, sae.cfg.hook_name, lambda i: _context_position(i, acts, start, rows))
    return acts.to(sae.W_enc.device, sae.W_enc.dtype)


def _context_position(i: int, acts: Tensor, start: int, rows: Tensor | None) -> str:
    """Where flat row i of acts (B, S - start, d) sat: its context (numbered by `rows`) and position."""
    if acts.dim() != 3:
        return f"row {i}"
    b, j = divmod(i, acts.shape[1])
    return f"context {int(rows[b]) if rows is not None else b}, position {start + j}"


def feature_acts(sae, lm=None, tokens: Tensor | None = None, acts: Tensor | None = None,
                 start: int = 0) -> Tensor:
    """SAE feature activations (B, S - start, d_sae) of the `hook_acts`."""
    return sae.encode(hook_acts(sae, lm, tokens, acts, start))


def active_features(sae, x: Tensor) -> ActiveFeatures:
    """The active entries of sae.encode(x) for x (..., d_in), rows flattened, from the SAE's
    sparse code (`sae.encode_sparse`): a topk SAE gives its k (value, index) slots per token
    with no dense (N, d_sae) matrix built or searched. Slots holding 0 are unused and dropped.
    Entries come token by token (row-major), so the scan's sums, which add each feature's
    entries in that order, do not depend on the order of slots within a token."""
    values, indices = sae.encode_sparse(x)
    tok_i = torch.arange(values.shape[0], device=values.device).repeat_interleave(values.shape[1])
    values, indices = values.flatten(), indices.flatten()
    keep = values != 0
    return ActiveFeatures(tok_i[keep], indices[keep], values[keep])


# ---- sources of contexts ---------------------------------------------------------------------
@dataclass
class ContextSource:
    """Whole held-out contexts and where their activations at the SAE's hook come from: the
    LM (live), or `acts_of(rows) -> (n, S - start, d_in)` (e.g. an activation cache, so nothing
    is recomputed). Feeds both the scan (`batches`) and `example_acts` (`encode_rows`), so the
    two read the same activations. Positions before `start` (BOS) are context only: not
    scanned, and NaN in example activations; positions always index `tokens`.

    `given`: batches of these contexts (rows = rows of `tokens`) with activations a caller
    computed; the scan reads them (once, from `start` on) instead of making its own, and
    examples still come from `acts_of` or the LM. `outliers`: the rule whose flagged rows the
    scan skips; they read as NaN in example activations too."""

    tokens: Tensor  # (n, S) token ids
    start: int = 0
    acts_of: Callable[[Tensor], Tensor] | None = None
    given: Iterable[ContextBatch] | None = None
    outliers: OutlierRule | None = None

    def batches(self, batch_size: int = 16) -> Iterator[ContextBatch]:
        if self.given is not None:
            return (batch.scanned_from(self.start) for batch in self.given)
        return (batch._replace(acts=self._acts(batch.rows), start=self.start)
                for batch in context_batches(self.tokens, batch_size))

    def n_batches(self, batch_size: int = 16) -> int | None:
        """How many `batches` there are (None: the caller's, of unknown number)."""
        return None if self.given is not None else -(-len(self.tokens) // batch_size)

    def encode_rows(self, sae, lm=None) -> Callable[[Tensor], Tensor]:
        """rows -> feature activations (n, S, d_sae) of those contexts, for example_acts; NaN at
        the positions the scan skips (before `start`, outlier rows)."""
        def encode(rows: Tensor) -> Tensor:
            x = hook_acts(sae, lm, self.tokens[rows], self._acts(rows), self.start, rows)
            f = sae.encode(x)
            if self.outliers is not None:
                f = f.masked_fill(self.outliers.mask(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], 1), float("nan"))
            return torch.nn.functional.pad(f, (0, 0, self.start, 0), value=float("nan"))
        return encode

    def _acts(self, rows: Tensor) -> Tensor | None:
        return None if self.acts_of is None else self.acts_of(rows)


def cache_source(cache: ActivationCache | str, sae, lm=None,
                 n_contexts: int | None = None) -> ContextSource:
    """The first `n_contexts` (None: all) contexts of an activation cache (an ActivationCache
    or its folder) with their cached activations at the SAE's hook. A cache without that hook,
    or made from a model other than `lm`, is a DataError. Point it at held-out text: a training
    run's cache holds its TRAIN split. Memory: the token ids of those contexts, and one batch
    of activations at a time."""
    cache = cache if isinstance(cache, ActivationCache) else open_cache(cache)
    hook = sae.cfg.hook_name
    cache.check_hooks([hook])
    if lm is not None:
        cache.check_model(lm)
    n = cache.n_contexts if n_contexts is None else min(n_contexts, cache.n_contexts)
    if n < 1:
        raise DataError(f"no contexts to scan: the activation cache at {cache.path} holds "
                        f"{cache.n_contexts} and {n_contexts} were asked for")
    return ContextSource(cache.context_tokens(np.arange(n)), cache.first_position,
                         lambda rows: cache.context_activations(rows, hook))


@torch.no_grad()
def example_acts(encode_rows: Callable[[Tensor], Tensor], rows: Tensor, positions: Tensor,
                 features: Tensor, window: tuple[int, int] | None = None,
                 batch_size: int = 16) -> list[tuple[int, Tensor]]:
    """Per-token activations around each requested example, fetched after the pass.

    `encode_rows(rows) -> (n, S, d_sae)` gives feature activations of token-array rows (e.g.
    `lambda r: feature_acts(sae, lm, contexts[r])`). Each request (row, position, feature) gets
    (start, acts) with acts = f[row, start:end, feature], start = max(0, pos - left) and
    end = min(S, pos + right + 1) for window (left, right); the whole context when None."""
    rows, positions, features = (torch.as_tensor(t).long().cpu() for t in (rows, positions, features))
    out: list[tuple[int, Tensor] | None] = [None] * len(rows)
    unique, inverse = torch.unique(rows, return_inverse=True)
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        f = encode_rows(chunk).cpu()
        for i in torch.nonzero((inverse >= start) & (inverse < start + len(chunk))).flatten().tolist():
            p, seq = int(positions[i]), f.shape[1]
            lo, hi = (0, seq) if window is None else (max(0, p - window[0]), min(seq, p + window[1] + 1))
            out[i] = (lo, f[int(inverse[i]) - start, lo:hi, int(features[i])].clone())
    return out
