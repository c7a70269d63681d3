"""Max-activating and quantile examples, densities, activation histograms and top tokens of
every feature, from ONE streaming pass of an SAE over held-out token contexts.

Memory is bounded by features x examples kept, never by tokens seen. Per batch of whole
contexts (B, S) the SAE's feature activations f (B, S, d_sae) are reduced, vectorised across
features, into:

* top contexts: each context counts once per feature, at its max position; a running top-k
  (torch.topk over the batch's contexts, merged with the kept k) per feature;
* quantile examples: uniform samples of active TOKENS from bins of [0, max]. The max is only
  known at the end, so bins live on a power-of-two range that re-bins exactly as the max
  grows, and samples are the smallest hash keys per bin (see interpret/sampling.py). The
  result is an exact uniform sample per bin, independent of batch size and order, in one pass;
  final bins are runs of fine bins, equal in width to within one fine bin (max / 32 at the
  default 64 fine bins);
* counts / sums (density, mean activation over active tokens), the exact histogram of active
  values over the same fine bins, and per-token-id counts and sums (top tokens): an exact dense
  (d_sae, vocab) table when d_sae * vocab <= `token_table_max`, else `token_capacity` slots per
  feature kept by count after each batch (then counts are lower bounds; the top few are right
  unless a token is frequent overall but rare in every batch).

Only (value, row, position) is kept per example; `example_acts` fetches the per-token
activations of the kept contexts afterwards (one more pass over just those contexts).
Batches are whole contexts: a tensor of token ids, or a `ContextBatch` carrying the rows of the
token array they are and, optionally, precomputed hook activations. A `ContextSource` gives
both the batches and the example fetcher, live (the LM) or from an activation cache
(`cache_source`: the cache's contexts, its stored activations, its BOS position skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saelab.data.cache.read import ActivationCache, open_cache
from saelab.errors import ConfigError, DataError
from saelab.interpret.sampling import KEY_MAX, BinSamples, first_per_group


@dataclass
class ScanConfig:
    """What the pass keeps per feature."""

    top_k: int = 10  # max-activating contexts
    n_quantiles: int = 5  # bins over [0, max] for uniform examples
    per_quantile: int = 3  # examples sampled per bin
    n_fine: int = 64  # fine bins: histogram resolution and the quantile bins' building blocks
    token_table_max: int = 1 << 24  # dense (d_sae, vocab) token counts up to this many cells
    token_capacity: int = 64  # else token slots per feature
    seed: int = 0  # of the hash keys that pick quantile examples

    def validate(self) -> None:
        for name in ("top_k", "n_quantiles", "per_quantile", "n_fine", "token_capacity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ScanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_quantiles * 2 > self.n_fine:
            raise ConfigError(f"n_quantiles ({self.n_quantiles}) must be at most n_fine / 2 "
                              f"({self.n_fine // 2}): each final bin needs a fine bin")


class ContextBatch(NamedTuple):
    tokens: Tensor  # (B, S) token ids of whole contexts
    rows: Tensor | None = None  # (B,) rows of the token array; default: counted from 0
    acts: Tensor | None = None  # (B, S - start, d_in) hook activations; default: run the LM
    # first position scanned (1 for a cache that dropped BOS): earlier tokens are context only,
    # and positions still count from the context's start
    start: int = 0


class TopContexts:
    """Running top-k contexts per feature by the context's max activation, and where it is."""

    def __init__(self, d_sae: int, k: int, device=None):
        self.value = torch.zeros(k, d_sae, device=device)
        self.row = torch.full((k, d_sae), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(k, d_sae, dtype=torch.int64, device=device)

    def update(self, ctx_max: Tensor, argpos: Tensor, rows: Tensor) -> None:
        """ctx_max, argpos: (B, d_sae) per-context max and its position; rows (B,)."""
        k = self.value.shape[0]
        top = ctx_max.topk(min(k, ctx_max.shape[0]), dim=0)
        value = torch.cat([self.value, top.values])
        row = torch.cat([self.row, rows[top.indices]])
        pos = torch.cat([self.pos, argpos.gather(0, top.indices)])
        keep = value.topk(k, dim=0).indices
        self.value, self.row, self.pos = (t.gather(0, keep) for t in (value, row, pos))


class TokenCounts:
    """How often each feature is active on each token id, and the summed activation there."""

    def __init__(self, d_sae: int, vocab: int, table_max: int, capacity: int, device=None):
        self.vocab, self.dense = vocab, d_sae * vocab <= table_max
        shape = (d_sae, vocab) if self.dense else (d_sae, capacity)
        self.count = torch.zeros(shape, dtype=torch.int32, device=device)
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)
        self.token = None if self.dense else torch.full(shape, -1, dtype=torch.int64, device=device)

    def update(self, feat: Tensor, token: Tensor, value: Tensor) -> None:
        key = feat * self.vocab + token
        if self.dense:
            self.count.view(-1).index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
            self.total.view(-1).index_add_(0, key, value.to(torch.float32))
            return
        held = self.token >= 0
        old_key = (torch.nonzero(held)[:, 0] * self.vocab + self.token[held])
        keys, inverse = torch.unique(torch.cat([old_key, key]), return_inverse=True)
        count = torch.zeros(keys.shape, dtype=torch.int32, device=key.device).index_add_(
            0, inverse, torch.cat([self.count[held], torch.ones_like(key, dtype=torch.int32)]))
        total = torch.zeros(keys.shape, dtype=torch.float32, device=key.device).index_add_(
            0, inverse, torch.cat([self.total[held], value.to(torch.float32)]))
        idx, rank = first_per_group(keys // self.vocab, -count, self.count.shape[1])
        feats = keys[idx] // self.vocab
        self.token.fill_(-1), self.count.zero_(), self.total.zero_()
        self.token[feats, rank], self.count[feats, rank] = keys[idx] % self.vocab, count[idx]
        self.total[feats, rank] = total[idx]

    def top(self, feature: int, n: int) -> list[tuple[int, int, float]]:
        """[(token id, count, mean activation)] by count, most frequent first."""
        count = self.count[feature]
        order = torch.argsort(count, descending=True, stable=True)[:n]
        order = order[count[order] > 0]
        ids = order if self.dense else self.token[feature, order]
        return [(int(t), int(count[o]), float(self.total[feature, o] / count[o]))
                for t, o in zip(ids.tolist(), order.tolist())]


class FeatureScan:
    """Accumulates everything the pass keeps; `update` once per batch of whole contexts."""

    def __init__(self, d_sae: int, vocab: int, config: ScanConfig | None = None, device=None):
        self.config = config or ScanConfig()
        self.config.validate()
        c = self.config
        self.d_sae, self.n_tokens = d_sae, 0
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(d_sae, device=device)
        self.top = TopContexts(d_sae, c.top_k, device)
        self.bins = BinSamples(d_sae, c.n_fine, c.per_quantile, device)
        self.tokens = TokenCounts(d_sae, vocab, c.token_table_max, c.token_capacity, device)

    def update(self, f: Tensor, tokens: Tensor, rows: Tensor, start: int = 0) -> None:
        """f (B, S, d_sae) feature activations of contexts `tokens` (B, S) at `rows` (B,);
        f[:, 0] is context position `start`."""
        B, S, _ = f.shape
        self.update_active(nonzero_acts(f.reshape(B * S, -1)), tokens, rows, start)

    def update_active(self, active: "ActiveFeatures", tokens: Tensor, rows: Tensor, start: int = 0) -> None:
        """The same from the active entries only: token i of the batch (row-major over tokens
        (B, S)) has feature `feat` at `value`; what a sparse encoder (topk) gives directly."""
        B, S = tokens.shape
        tok_i, feat, value = active
        if bool((value < 0).any()):  # no architecture gives negatives; "active" means > 0
            tok_i, feat, value = (t[value > 0] for t in (tok_i, feat, value))
        if not bool(torch.isfinite(value).all()):
            raise DataError("feature activations contain Inf")
        pos = tok_i % S + start
        ctx_max, argpos = self._context_max(B, S, tok_i, feat, value, pos)
        batch_max = ctx_max.max(dim=0).values
        self.n_tokens += B * S
        self.max_act = torch.maximum(self.max_act, batch_max)
        self.top.update(ctx_max, argpos, rows)
        self.count += torch.bincount(feat, minlength=self.d_sae)
        self.act_sum.index_add_(0, feat, value.to(torch.float64))
        self.bins.grow(batch_max)
        self.bins.add(feat, value, rows[tok_i // S], pos, self.config.seed)
        self.tokens.update(feat, tokens.reshape(-1)[tok_i], value)

    def _context_max(self, B, S, tok_i, feat, value, pos) -> tuple[Tensor, Tensor]:
        """Each context's max activation per feature and its first position, (B, d_sae) each,
        reduced from the active entries only (0 and a position past the end where silent)."""
        group = (tok_i // S) * self.d_sae + feat
        ctx_max = value.new_zeros(B * self.d_sae).scatter_reduce_(0, group, value, "amax")
        at_max = value == ctx_max[group]
        past_end = torch.iinfo(torch.int64).max
        argpos = torch.full((B * self.d_sae,), past_end, dtype=torch.int64, device=value.device)
        argpos.scatter_reduce_(0, group[at_max], pos[at_max], "amin")
        return ctx_max.view(B, -1), argpos.view(B, -1)

    # ---- results ----------------------------------------------------------------------
    @property
    def density(self) -> Tensor:
        """(d_sae,) fraction of scanned tokens on which each feature is > 0."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> Tensor:
        """(d_sae,) mean activation over the tokens where the feature is active (0 if dead)."""
        return self.act_sum / self.count.clamp_min(1)

    def act_hist(self, feature: int) -> tuple[list[float], list[int]]:
        """Exact histogram of active values: fine bins (lo, hi] up to the first edge >= max."""
        exp = int(self.bins.exp[feature])
        if exp == BinSamples.UNSET:
            return [], []
        counts = self.bins.counts[feature]
        used = int(torch.nonzero(counts).max()) + 1
        width = 2.0 ** exp / self.config.n_fine
        return [i * width for i in range(used + 1)], counts[:used].tolist()

    def top_examples(self, feature: int) -> list[tuple[float, int, int]]:
        """[(max activation, context row, position)], highest first (ties: lower row first);
        only active contexts."""
        v, r, p = (t[:, feature].tolist() for t in (self.top.value, self.top.row, self.top.pos))
        return sorted(((a, b, c) for a, b, c in zip(v, r, p) if a > 0), key=lambda e: (-e[0], e[1]))

    def quantiles(self) -> "Quantiles":
        """Uniform examples per activation bin for every feature (computed once, at the end)."""
        q = self.bins.quantiles(self.max_act, self.config.n_quantiles, self.config.per_quantile)
        return Quantiles(**q)

    def top_tokens(self, feature: int, n: int = 10) -> list[tuple[int, int, float]]:
        return self.tokens.top(feature, n)


class Quantiles(NamedTuple):
    edges: Tensor  # (d_sae, n_bins + 1); the last edge is the feature's max
    key: Tensor  # (d_sae, n_bins, per_bin); KEY_MAX where a bin has fewer items
    value: Tensor
    row: Tensor
    pos: Tensor

    def of(self, feature: int) -> list[tuple[float, float, list[tuple[float, int, int]]]]:
        """[(lo, hi, [(activation, row, position), ...]), ...] bins low to high; empty bins kept."""
        edges, out = self.edges[feature].tolist(), []
        for b in range(self.key.shape[1]):
            got = self.key[feature, b] < KEY_MAX
            items = zip(*(t[feature, b][got].tolist() for t in (self.value, self.row, self.pos)))
            out.append((edges[b], edges[b + 1], sorted(items)))
        return out


# ---- driving the pass --------------------------------------------------------------------
def context_batches(contexts: Tensor, batch_size: int = 16) -> Iterator[ContextBatch]:
    """Batches of rows of a token array (n, S), with their row numbers."""
    for start in range(0, contexts.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, contexts.shape[0]))
        yield ContextBatch(contexts[start:start + batch_size], rows)


class ActiveFeatures(NamedTuple):
    tok_i: Tensor  # (n,) token index in the batch, row-major
    feat: Tensor  # (n,) feature index
    value: Tensor  # (n,) activation


def nonzero_acts(f: Tensor) -> ActiveFeatures:
    """The active entries of dense feature activations f (N, d_sae): the only pass over f."""
    tok_i, feat = torch.nonzero(f, as_tuple=True)
    return ActiveFeatures(tok_i, feat, f[tok_i, feat])


def hook_acts(sae, lm=None, tokens: Tensor | None = None, acts: Tensor | None = None,
              start: int = 0) -> Tensor:
    """Activations at the SAE's hook (B, S - start, d_in) of context positions start..: `acts`
    if given (those positions only), else the LM's for the whole contexts `tokens` (the LM
    sees every position; the pass stops at that hook); checked finite, on the SAE's device."""
    if acts is None:
        if lm is None:
            raise ConfigError("no activations given and no LM to compute them from")
        hook = sae.cfg.hook_name
        acts = lm.run_with_cache(tokens, [hook])[hook][:, start:]
    if not bool(torch.isfinite(acts).all()):
        raise DataError("activations contain NaN or Inf")
    return acts.to(sae.W_enc.device, sae.W_enc.dtype)


def feature_acts(sae, lm=None, tokens: Tensor | None = None, acts: Tensor | None = None,
                 start: int = 0) -> Tensor:
    """SAE feature activations (B, S - start, d_sae) of the `hook_acts`."""
    return sae.encode(hook_acts(sae, lm, tokens, acts, start))


def active_features(sae, x: Tensor) -> ActiveFeatures:
    """The active entries of sae.encode(x) for x (..., d_in), rows flattened: straight from the
    (values, indices) of a sparse encoder such as topk, with no dense (N, d_sae) matrix built
    and searched; through the dense activations otherwise."""
    x = x.reshape(-1, x.shape[-1])
    sparse = sae.activation.sparse
    if sparse is None:
        return nonzero_acts(sae.encode(x))
    values, indices = sparse(sae.pre_acts(x))
    tok_i = torch.arange(x.shape[0], device=x.device).repeat_interleave(values.shape[1])
    keep = values.flatten() > 0
    return ActiveFeatures(tok_i[keep], indices.flatten()[keep], values.flatten()[keep])


@torch.no_grad()
def scan_features(batches: Iterable[Tensor | ContextBatch], sae, lm=None, *,
                  config: ScanConfig | None = None, vocab_size: int | None = None,
                  progress: bool | None = None, total: int | None = None) -> FeatureScan:
    """The one pass: feed every batch's feature activations to a FeatureScan and return it."""
    vocab = vocab_size or (lm.W_E.shape[0] if lm is not None else None)
    if vocab is None:
        raise ConfigError("scan_features needs vocab_size when no LM is given")
    device = sae.W_enc.device
    scan, next_row = FeatureScan(sae.cfg.d_sae, vocab, config, device), 0
    bar = tqdm(batches, desc="feature scan", total=total, unit="batch",
               disable=None if progress is None else not progress)
    for batch in bar:
        batch = batch if isinstance(batch, ContextBatch) else ContextBatch(batch)
        tokens = torch.as_tensor(batch.tokens).to(device)
        if tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise DataError(f"a batch must be (contexts, seq) token ids, got {tuple(tokens.shape)}")
        rows = (torch.arange(next_row, next_row + len(tokens)) if batch.rows is None
                else torch.as_tensor(batch.rows).long().flatten())
        if rows.shape != (len(tokens),):
            raise DataError(f"a batch of {len(tokens)} contexts needs {len(tokens)} rows, got {tuple(rows.shape)}")
        next_row = int(rows.max()) + 1
        x = hook_acts(sae, lm, tokens, batch.acts, batch.start)
        scanned = tokens[:, batch.start:]
        if x.shape[:2] != scanned.shape:
            raise DataError(f"activations {tuple(x.shape[:2])} do not match tokens {tuple(scanned.shape)}"
                            f" (positions {batch.start}.. of contexts {tuple(tokens.shape)})")
        scan.update_active(active_features(sae, x), scanned.long(), rows.to(device), batch.start)
    return scan


@dataclass
class ContextSource:
    """Whole held-out contexts and where their activations at the SAE's hook come from: the
    LM (live), or `acts_of(rows) -> (n, S - start, d_in)` (e.g. an activation cache, so nothing
    is recomputed). Feeds both the scan (`batches`) and `example_acts` (`encode_rows`), so the
    two read the same activations. Positions before `start` (the BOS a cache dropped) are
    context only: not scanned, and 0 in example activations; positions always index `tokens`."""

    tokens: Tensor  # (n, S) token ids
    start: int = 0
    acts_of: Callable[[Tensor], Tensor] | None = None

    def batches(self, batch_size: int = 16) -> Iterator[ContextBatch]:
        for batch in context_batches(self.tokens, batch_size):
            yield batch._replace(acts=self._acts(batch.rows), start=self.start)

    def encode_rows(self, sae, lm=None) -> Callable[[Tensor], Tensor]:
        """rows -> feature activations (n, S, d_sae) of those contexts, for example_acts."""
        def encode(rows: Tensor) -> Tensor:
            f = feature_acts(sae, lm, self.tokens[rows], self._acts(rows), self.start)
            return torch.nn.functional.pad(f, (0, 0, self.start, 0))
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
