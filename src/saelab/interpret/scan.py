"""Max-activating and quantile examples, densities, activation histograms and top tokens of
every feature, from ONE streaming pass of an SAE over held-out token contexts.

Memory is bounded by features x examples kept, never by tokens seen. Per batch of whole
contexts (B, S) the SAE's active features (token, feature, value) are reduced, vectorised
across features, into:

* top contexts: each context counts once per feature, at its max position; a running top-k
  (torch.topk over the batch's contexts, merged with the kept k) per feature;
* quantile examples: uniform samples of active TOKENS from bins of [0, max]. The max is only
  known at the end, so bins live on a power-of-two range that re-bins exactly as the max
  grows, and samples are the smallest hash keys per bin (see interpret/sampling.py). The
  result is an exact uniform sample per bin, independent of batch size and order, in one pass;
  final bins are runs of fine bins, equal in width to within one fine bin (max / 32 at the
  default 64 fine bins);
* counts / sums (density, mean activation over active tokens), the exact histogram of active
  values over the same fine bins (so each quantile bin's count is exact), and per-token-id
  counts and sums (top tokens, and the share of a feature's activation mass on its top token
  id: single-token features): an exact dense
  (d_sae, vocab) table when d_sae * vocab <= `token_table_max`, else `token_capacity` slots per
  feature kept by count after each batch (then counts are lower bounds; the top few are right
  unless a token is frequent overall but rare in every batch).

* co-activation of the features given detail (`coactive`): on how many tokens each fires
  together with each other feature, in the same dense-table-or-slots form as the token counts
  (a (tracked, d_sae) table while it has at most `coactive_table_max` cells, else
  `coactive_capacity` partners per feature, kept by count), from which `coactive_partners` ranks
  partners by the correlation of the two features' firing (phi). The pairs of a token are its
  active features taken two at a time, so the work is tokens x L0 x (tracked features' L0),
  bounded per batch by `coactive_max_pairs` (beyond it, a regular sample of the batch's tokens).

Only (value, row, position) is kept per example; `sources.example_acts` fetches the per-token
activations of the kept contexts afterwards (one more pass over just those contexts). Where
batches and activations come from is interpret/sources.py.

With an outlier rule (saelab.data.outliers) the rows it flags in each batch's activations are
not scanned: never examples, not counted in densities, histograms or `n_tokens`; `outliers`
tallies them (how many, at which positions, on which tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from saelab.data.outliers import OutlierRule, OutlierTally
from saelab.errors import ConfigError, DataError
from saelab.interpret.sampling import KEY_MAX, BinSamples, first_per_group
from saelab.interpret.sources import ActiveFeatures, ContextBatch, active_features, hook_acts, nonzero_acts
from saelab.progress import progress_bar

SINGLE_TOKEN_SHARE = 0.9  # a feature with more of its activation mass on one token id is single-token


@dataclass
class ScanConfig:
    """What the pass keeps per feature."""

    top_k: int = 10  # max-activating contexts
    n_quantiles: int = 5  # bins over [0, max] for uniform examples
    per_quantile: int = 3  # examples sampled per bin
    n_fine: int = 64  # fine bins: histogram resolution and the quantile bins' building blocks
    token_table_max: int = 1 << 24  # dense (d_sae, vocab) token counts up to this many cells
    token_capacity: int = 64  # else token slots per feature
    coactive_table_max: int = 1 << 22  # dense (tracked features, d_sae) co-activation counts up to this many cells
    coactive_capacity: int = 32  # else co-active partner slots per tracked feature
    coactive_max_pairs: int = 1 << 22  # co-active pairs counted per batch; beyond, every s-th token (CoActivation)
    seed: int = 0  # of the hash keys that pick quantile examples

    def validate(self) -> None:
        for name in ("top_k", "n_quantiles", "per_quantile", "n_fine", "token_capacity", "coactive_capacity",
                     "coactive_max_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ScanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_quantiles * 2 > self.n_fine:
            raise ConfigError(f"n_quantiles ({self.n_quantiles}) must be at most n_fine / 2 "
                              f"({self.n_fine // 2}): each final bin needs a fine bin")


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
        """Add active entries (feature, token id, value), (n,) each. The dense table adds in
        place; the slot table merges its held (feature, token) pairs with the batch's, then keeps
        each feature's `capacity` most frequent."""
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


def token_pairs(tok_i: Tensor, tracked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(a, b) entry indices of every ordered pair of distinct active entries on one token, for
    entries `tok_i` (n,) sorted by token; with `tracked` (n,) bool only pairs whose first entry
    is tracked."""
    n = tok_i.numel()
    if n == 0:
        return tok_i.new_zeros(0), tok_i.new_zeros(0)
    _, group, size = torch.unique_consecutive(tok_i, return_inverse=True, return_counts=True)
    first = (torch.cumsum(size, 0) - size)[group]  # each entry's token's first entry
    own = size[group]
    a = torch.arange(n, device=tok_i.device)
    if tracked is not None:
        a, own, first = a[tracked], own[tracked], first[tracked]
    pair_a = a.repeat_interleave(own)
    offset = torch.arange(pair_a.numel(), device=tok_i.device) - (torch.cumsum(own, 0) - own).repeat_interleave(own)
    pair_b = first.repeat_interleave(own) + offset
    keep = pair_a != pair_b
    return pair_a[keep], pair_b[keep]


class CoActivation:
    """On how many tokens each tracked feature fires together with each other feature (counts in
    a `TokenCounts` whose "token ids" are partner features), with each feature's own count and
    the tokens counted. A batch whose pairs would exceed `coactive_max_pairs` (dense codes: MLP
    neurons, high-L0 SAEs) is counted on every s-th of its tokens only, s the smallest stride
    within budget; the counts, the features' own and the token total then cover the same
    tokens, so the correlations stay consistent."""

    def __init__(self, tracked: Tensor, d_sae: int, config: ScanConfig, device=None):
        self.features = tracked.long().to(device)
        self.row_of = torch.full((d_sae,), -1, dtype=torch.int64, device=device)
        self.row_of[self.features] = torch.arange(len(self.features), device=device)
        self.counts = TokenCounts(len(self.features), d_sae, config.coactive_table_max, config.coactive_capacity,
                                  device)
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)  # tokens each feature fires on
        self.n_tokens, self.max_pairs = 0, config.coactive_max_pairs

    def update(self, tok_i: Tensor, feat: Tensor, kept: Tensor, chunk: int = 1 << 16) -> None:
        """Add a batch: its active entries (token index, feature) and `kept` (n_positions,) bool,
        the positions scanned. `chunk` tracked entries' pairs at a time (memory: chunk x the
        largest L0)."""
        if tok_i.numel() > 1 and not bool((tok_i[1:] >= tok_i[:-1]).all()):
            order = torch.argsort(tok_i, stable=True)
            tok_i, feat = tok_i[order], feat[order]
        size = torch.bincount(tok_i, minlength=kept.numel())
        pairs = int((size[tok_i] * (self.row_of[feat] >= 0)).sum())
        stride = max(1, -(-pairs // self.max_pairs))
        if stride > 1:
            sampled = tok_i % stride == 0
            tok_i, feat = tok_i[sampled], feat[sampled]
            kept = kept & (torch.arange(kept.numel(), device=kept.device) % stride == 0)
        self.n_tokens += int(kept.sum())
        self.count += torch.bincount(feat, minlength=self.count.numel())
        rows = self.row_of[feat]
        tracked = torch.nonzero(rows >= 0).flatten()
        for start in range(0, tracked.numel(), chunk):
            mask = torch.zeros_like(rows, dtype=torch.bool)
            mask[tracked[start:start + chunk]] = True
            a, b = token_pairs(tok_i, mask)
            self.counts.update(rows[a], feat[b], torch.ones_like(a, dtype=torch.float32))

    def partners(self, feature: int, n: int) -> list[tuple[int, int, float]]:
        """[(partner, tokens both fire on, phi)] of a tracked feature, highest phi first, only
        positive correlations. phi = (N n_ab - n_a n_b) / sqrt(n_a (N - n_a) n_b (N - n_b)), the
        Pearson correlation of the two features' "fires" indicators over the N tokens counted."""
        row = int(self.row_of[feature])
        if row < 0:
            return []
        count = self.count
        N, n_a = float(self.n_tokens), float(count[feature])
        out = []
        for b, n_ab, _ in self.counts.top(row, self.counts.count.shape[1]):
            n_b = float(count[b])
            denom = (n_a * (N - n_a) * n_b * (N - n_b)) ** 0.5
            phi = (N * n_ab - n_a * n_b) / denom if denom > 0 else float("nan")
            if phi > 0:
                out.append((b, n_ab, phi))
        return sorted(out, key=lambda p: (-p[2], p[0]))[:n]


class FeatureScan:
    """Accumulates everything the pass keeps; `update` once per batch of whole contexts.
    `coactive`: the features whose co-active partners are counted (None: none)."""

    def __init__(self, d_sae: int, vocab: int, config: ScanConfig | None = None, device=None,
                 coactive: Tensor | None = None):
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
        self.outliers = OutlierTally()  # rows an outlier rule kept out of the scan
        self.coactive = None if coactive is None or not len(coactive) else \
            CoActivation(torch.as_tensor(coactive), d_sae, c, device)

    def update(self, f: Tensor, tokens: Tensor, rows: Tensor, start: int = 0) -> None:
        """f (B, S, d_sae) feature activations of contexts `tokens` (B, S) at `rows` (B,);
        f[:, 0] is context position `start`."""
        B, S, _ = f.shape
        self.update_active(nonzero_acts(f.reshape(B * S, -1)), tokens, rows, start)

    def update_active(self, active: ActiveFeatures, tokens: Tensor, rows: Tensor, start: int = 0,
                      skip: Tensor | None = None) -> None:
        """The same from the active entries only: token i of the batch (row-major over tokens
        (B, S)) has feature `feat` at `value`; what a sparse encoder (topk) gives directly.
        `skip` (B, S) bool: tokens left out of the scan (outlier rows), tallied in `outliers`."""
        B, S = tokens.shape
        if skip is not None:
            self.outliers.update(skip.reshape(-1), (torch.arange(S, device=skip.device) + start).repeat(B),
                                 tokens.reshape(-1))
            if bool(skip.any()):
                kept = ~skip.reshape(-1)[active.tok_i]
                active = ActiveFeatures(*(t[kept] for t in active))
        tok_i, feat, value = active
        if bool((value < 0).any()):  # no architecture gives negatives; "active" means > 0
            tok_i, feat, value = (t[value > 0] for t in (tok_i, feat, value))
        if not bool(torch.isfinite(value).all()):
            raise DataError("feature activations contain Inf")
        pos = tok_i % S + start
        ctx_max, argpos = self._context_max(B, S, tok_i, feat, value, pos)
        batch_max = ctx_max.max(dim=0).values
        self.n_tokens += B * S - (0 if skip is None else int(skip.sum()))
        self.max_act = torch.maximum(self.max_act, batch_max)
        self.top.update(ctx_max, argpos, rows)
        self.count += torch.bincount(feat, minlength=self.d_sae)
        self.act_sum.index_add_(0, feat, value.to(torch.float64))
        self.bins.grow(batch_max)
        self.bins.add(feat, value, rows[tok_i // S], pos, self.config.seed)
        self.tokens.update(feat, tokens.reshape(-1)[tok_i], value)
        if self.coactive is not None:
            self.coactive.update(tok_i, feat, torch.ones(B * S, dtype=torch.bool, device=tok_i.device)
                                 if skip is None else ~skip.reshape(-1))

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

    def coactive_partners(self, feature: int, n: int = 10) -> list[tuple[int, int, float]]:
        """The features that fire with `feature` most in step, [(partner, tokens both fire on,
        phi)], highest phi first (CoActivation.partners); [] unless it was tracked."""
        return [] if self.coactive is None else self.coactive.partners(feature, n)

    def top_token_share(self) -> Tensor:
        """(d_sae,) share of each feature's activation mass (the sum of its activations) on the
        one token id holding the most of it; NaN where dead. A share above SINGLE_TOKEN_SHARE
        makes a single-token feature. Exact with the dense token table; with token slots
        (d_sae * vocab > token_table_max) that id's mass is a lower bound, and so is the count of
        single-token features."""
        top = self.tokens.total.double().amax(dim=1)
        share = (top / self.act_sum.clamp_min(1e-300)).clamp(0.0, 1.0)
        return torch.where(self.count > 0, share, torch.full_like(share, float("nan")))


class Quantiles(NamedTuple):
    edges: Tensor  # (d_sae, n_bins + 1); the last edge is the feature's max
    count: Tensor  # (d_sae, n_bins) active tokens in each bin, exactly
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

    def counts_of(self, feature: int) -> list[int]:
        """Active tokens in each bin of `feature`, low to high (they sum to its active count)."""
        return self.count[feature].tolist()


@torch.no_grad()
def scan_features(batches: Iterable[Tensor | ContextBatch], sae, lm=None, *,
                  config: ScanConfig | None = None, vocab_size: int | None = None,
                  progress: bool | None = None, total: int | None = None,
                  outliers: OutlierRule | None = None, coactive=None) -> FeatureScan:
    """The one pass: feed every batch's feature activations to a FeatureScan and return it,
    without the rows `outliers` flags in each batch (None: every row scanned). `coactive`:
    features whose co-active partners to count (FeatureScan)."""
    vocab = vocab_size or (lm.W_E.shape[0] if lm is not None else None)
    if vocab is None:
        raise ConfigError("scan_features needs vocab_size when no LM is given")
    device = sae.W_enc.device
    scan, next_row = FeatureScan(sae.cfg.d_sae, vocab, config, device, coactive), 0
    bar = progress_bar(batches, desc="feature scan", total=total, unit="batch", enabled=progress)
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
        x = hook_acts(sae, lm, tokens, batch.acts, batch.start, rows)
        scanned = tokens[:, batch.start:]
        if x.shape[:2] != scanned.shape:
            raise DataError(f"activations {tuple(x.shape[:2])} do not match tokens {tuple(scanned.shape)}"
                            f" (positions {batch.start}.. of contexts {tuple(tokens.shape)})")
        skip = None if outliers is None else outliers.mask(x.reshape(-1, x.shape[-1])).view(x.shape[:2])
        scan.update_active(active_features(sae, x), scanned.long(), rows.to(device), batch.start, skip)
    return scan
