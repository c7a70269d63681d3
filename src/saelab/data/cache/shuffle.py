"""Shuffled training batches with bounded memory, from a cache on disk or live from the LM, and
the two pieces every consumer of activation batches shares: the batch format (`as_pair`) and
the activation rows of token contexts (`hook_rows`).

A batch is x (B, d) (an SAE's input is its target) or a pair (x, y) (a transcoder's input and
target, rows aligned). `hook_rows` runs the LM once per token batch, stopping after the last
hook asked for, and flattens each hook's (batch, seq, d) activations to rows, the BOS position
dropped if asked; live batches, evaluation (saelab.evals) and the mean-ablation pass take
their rows from it, and the disk cache stores the same rows.

The shuffled streams read rows context by context through a `load(context_ids) -> tuple of
(rows, d) tensors` function, so the shuffle is one piece of code: each epoch visits the
contexts in a fresh random order, cut into windows of `window_contexts` contexts; a window's
rows are loaded together (the only large buffer; its contexts in index order, for sequential
reads), permuted, and cut into batches. Batches run on across window and epoch boundaries:
batch `step` is rows [step * B, (step + 1) * B) of one endless stream, a pure function of
(seed, step), so `iter_from(step)` resumes a training run exactly by loading only the window
that step falls in. The same seed, window and batch size give the same batches from a disk
cache and from live mode. `in_memory` live batches keep every row (one window, loaded once).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, DataError

Loader = Callable[[np.ndarray], tuple]  # context ids (n,) -> tensors (n * rows_per_context, d)


def as_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a batch that is x (then y is x, the same tensor) or an (x, y) pair."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DataError(f"a batch must be x or (x, y); got a sequence of {len(batch)}")
        return batch[0], batch[1]
    return batch, batch


def hook_rows(lm, tokens, hooks: Sequence[str], drop_bos: bool = True) -> dict[str, torch.Tensor]:
    """{hook: (batch * rows, d)} activation rows of `tokens` (batch, seq) from one early-stopping
    LM pass, in the LM's dtype and device; rows = seq - 1 with `drop_bos` (position 0 left
    out), else seq. Row i is the same position at every hook."""
    first = 1 if drop_bos else 0
    cache = lm.run_with_cache(tokens, list(hooks))
    return {h: a[:, first:].reshape(-1, a.shape[-1]) for h, a in cache.items()}


def window_contexts_for(buffer_mb: float, rows_per_context: int, dims: Sequence[int]) -> int:
    """Contexts per window so that one window of float32 rows of all `dims` fits in buffer_mb."""
    if buffer_mb <= 0:
        raise ConfigError(f"buffer_mb must be > 0, got {buffer_mb}")
    per_context = rows_per_context * sum(dims) * 4
    return max(1, int(buffer_mb * 2**20) // per_context)


class ShuffledBatches:
    """Iterable of shuffled batches: x (B, d) or (x, y) pairs when `load` returns two tensors
    (a transcoder's input and target, rows aligned). Deterministic given the seed; `epochs=None`
    runs forever, else stops after `epochs` passes (a last partial batch is dropped)."""

    def __init__(self, load: Loader, n_contexts: int, rows_per_context: int, batch_size: int,
                 window_contexts: int, *, seed: int = 0, epochs: int | None = None,
                 dims: Sequence[int] = (), out_dtype: torch.dtype = torch.float32):
        if batch_size < 1 or window_contexts < 1 or n_contexts < 1 or rows_per_context < 1:
            raise ConfigError(f"batch_size, window_contexts, n_contexts and rows_per_context "
                              f"must be >= 1 (got {batch_size}, {window_contexts}, "
                              f"{n_contexts}, {rows_per_context})")
        if seed < 0 or (epochs is not None and epochs < 1):
            raise ConfigError(f"seed must be >= 0 and epochs >= 1 or None (got {seed}, {epochs})")
        self.load, self.n_contexts, self.rows_per_context = load, n_contexts, rows_per_context
        self.batch_size, self.window_contexts = batch_size, min(window_contexts, n_contexts)
        self.seed, self.epochs, self.dims, self.out_dtype = seed, epochs, tuple(dims), out_dtype

    @property
    def rows_per_epoch(self) -> int:
        return self.n_contexts * self.rows_per_context

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless batch stream (epochs=None) has no length")
        return self.epochs * self.rows_per_epoch // self.batch_size

    def __iter__(self) -> Iterator:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator:
        """The batches from number `step` on (0-based), exactly as a fresh iteration gives them."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        end = None if self.epochs is None else len(self)
        return self._batches(step, end)

    def _batches(self, step: int, end: int | None) -> Iterator:
        pieces, have, B = [], 0, self.batch_size
        if end is not None and step >= end:
            return
        for chunk in self._rows_from(step * B):
            while chunk[0].shape[0]:
                take = min(B - have, chunk[0].shape[0])
                pieces.append([c[:take] for c in chunk])
                chunk = [c[take:] for c in chunk]
                have += take
                if have == B:
                    yield self._emit(pieces)
                    pieces, have, step = [], 0, step + 1
                    if end is not None and step >= end:
                        return

    def _emit(self, pieces: list[list[torch.Tensor]]):
        cols = [torch.cat(col) if len(col) > 1 else col[0] for col in zip(*pieces)]
        cols = [c.to(self.out_dtype) for c in cols]
        return cols[0] if len(cols) == 1 else tuple(cols)

    def _rows_from(self, pos: int) -> Iterator[list[torch.Tensor]]:
        """Chunks of permuted rows (lists of tensors, one per hook) from row `pos` of the stream."""
        W, R = self.window_contexts, self.rows_per_context
        epoch, offset = divmod(pos, self.rows_per_epoch)
        while self.epochs is None or epoch < self.epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_contexts)
            first, offset = divmod(offset, W * R)
            for w in range(first, -(-self.n_contexts // W)):
                ids = np.sort(order[w * W:(w + 1) * W])  # sorted: sequential reads
                arrays = self.load(ids)
                n = len(ids) * R
                if any(a.shape[0] != n for a in arrays):
                    raise DataError(f"loader returned {[a.shape[0] for a in arrays]} rows for "
                                    f"{len(ids)} contexts; expected {n}")
                perm = np.random.default_rng([self.seed, epoch, w, 1]).permutation(n)
                perm = torch.from_numpy(perm[offset:]).to(arrays[0].device)
                offset = 0
                for i in range(0, perm.shape[0], self.batch_size):
                    idx = perm[i:i + self.batch_size]
                    yield [a[idx] for a in arrays]
                arrays = perm = None  # free this window before loading the next
            epoch += 1


class LiveLoader:
    """Activations computed on demand: `load(ids)` runs the LM on those contexts (one forward
    per `forward_batch_size` contexts feeds every hook) and returns one (rows, d) tensor per
    hook, BOS position dropped if asked."""

    def __init__(self, lm, contexts, hooks: Sequence[str], drop_bos: bool = True,
                 forward_batch_size: int = 32):
        self.contexts = torch.as_tensor(np.asarray(contexts) if not isinstance(
            contexts, torch.Tensor) else contexts)
        if self.contexts.ndim != 2 or self.contexts.shape[0] == 0:
            raise DataError(f"live mode needs a (n_contexts, context_length) token array, got "
                            f"shape {tuple(self.contexts.shape)}")
        self.lm, self.hooks, self.drop_bos = lm, list(hooks), drop_bos
        self.dims = [lm.hook_dim(h) for h in self.hooks]
        self.rows_per_context = self.contexts.shape[1] - int(drop_bos)
        self.forward_batch_size = forward_batch_size
        if self.rows_per_context < 1 or forward_batch_size < 1:
            raise ConfigError("contexts must be longer than 1 token when dropping BOS, and "
                              "forward_batch_size >= 1")

    def __call__(self, ids: np.ndarray) -> tuple[torch.Tensor, ...]:
        ctx = self.contexts[torch.from_numpy(np.asarray(ids, dtype=np.int64))]
        outs: list[list[torch.Tensor]] = [[] for _ in self.hooks]
        for i in range(0, ctx.shape[0], self.forward_batch_size):
            rows = hook_rows(self.lm, ctx[i:i + self.forward_batch_size], self.hooks, self.drop_bos)
            for out, hook in zip(outs, self.hooks):
                out.append(rows[hook])
        return tuple(torch.cat(out) for out in outs)


class MemoryLoader:
    """A loader's rows for every context, computed on first use and then kept in memory: for
    small training sets seen for many epochs (the LM runs once, not once per epoch)."""

    def __init__(self, load: Loader, n_contexts: int, rows_per_context: int):
        self.load, self.n_contexts, self.rows_per_context = load, n_contexts, rows_per_context
        self.rows: tuple | None = None

    def __call__(self, ids: np.ndarray) -> tuple[torch.Tensor, ...]:
        if self.rows is None:
            self.rows = self.load(np.arange(self.n_contexts))
        R = self.rows_per_context
        ctx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        idx = (ctx[:, None] * R + torch.arange(R)).flatten().to(self.rows[0].device)
        return tuple(r[idx] for r in self.rows)


def live_batches(lm, contexts, hook: str, batch_size: int, *, target: str | None = None,
                 seed: int = 0, epochs: int | None = None, buffer_mb: float = 256,
                 drop_bos: bool = True, forward_batch_size: int = 32,
                 in_memory: bool = False) -> ShuffledBatches:
    """Shuffled batches straight from the LM, no disk: x (B, d) at `hook`, or (x, y) with y
    at `target` for a transcoder. contexts: (n, context_length) token ids. Memory: one window
    of about `buffer_mb` MiB of activations; with `in_memory`, every context's rows (the LM
    runs once over all contexts and each epoch is one shuffle of all rows). Resumable with
    `iter_from(step)`."""
    hooks = [hook] if target is None else [hook, target]
    loader = LiveLoader(lm, contexts, hooks, drop_bos, forward_batch_size)
    n, rows = loader.contexts.shape[0], loader.rows_per_context
    if in_memory:
        return ShuffledBatches(MemoryLoader(loader, n, rows), n, rows, batch_size, n,
                               seed=seed, epochs=epochs, dims=loader.dims)
    window = window_contexts_for(buffer_mb, rows, loader.dims)
    return ShuffledBatches(loader, n, rows, batch_size, window, seed=seed, epochs=epochs, dims=loader.dims)
