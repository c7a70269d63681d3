"""Read an activation cache: shuffled training batches, and a sequential pass with the text.

Shards are memory-mapped, never read whole: a shuffled window gathers its contexts straight
from the maps, and the sequential reader copies one batch at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

import saelab.data.cache.format as fmt
from saelab.data.cache.shuffle import ShuffledBatches, window_contexts_for
from saelab.errors import CorruptFileError, DataError, MissingFileError


class CacheChunk(NamedTuple):
    """Consecutive cached rows and where each came from (all rows of whole contexts)."""

    acts: torch.Tensor | dict  # (n, d) float32, or {hook: (n, d)} when several hooks are asked
    token_ids: torch.Tensor  # (n,) the token at each row
    context_idx: torch.Tensor  # (n,) index of the row's context in the cache
    positions: torch.Tensor  # (n,) the row's position in its context


class ActivationCache:
    """An activation cache on disk (see saelab.data.cache.format for the layout). Use `open_cache`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = m = fmt.read_manifest(self.path)
        try:
            self.hooks: list[str] = [h["name"] for h in m["hooks"]]
            self._dims = {h["name"]: int(h["dim"]) for h in m["hooks"]}
            self.dtype: str = m["dtype"]
            self._np_dtype = fmt.DTYPES[self.dtype][1]
            self.rows_per_context: int = int(m["rows_per_context"])
            self.first_position: int = int(m["first_position"])
            self.context_length: int = int(m["context_length"])
            self.shard_contexts: int = int(m["shard_contexts"])
            m["model"]["fingerprint"]
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{self.path / fmt.MANIFEST} has no valid entry {err}") from err
        for k in range(m["shards_done"]):
            for path in [fmt.tokens_path(self.path, k)] + [fmt.acts_path(self.path, h, k)
                                                           for h in self.hooks]:
                if not path.exists():
                    raise MissingFileError(f"activation cache file {path} is missing")
        self._maps: dict[tuple[str, int], np.ndarray] = {}  # open memory maps, at most 64

    # ---- what is in it --------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def n_contexts(self) -> int:
        return int(self.manifest["contexts_done"])

    @property
    def n_tokens(self) -> int:
        """Activation rows per hook (tokens cached, BOS positions excluded if dropped)."""
        return int(self.manifest["tokens_done"])

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def dim(self, hook: str) -> int:
        self.check_hooks([hook])
        return self._dims[hook]

    def check_hooks(self, hooks: Sequence[str]) -> None:
        missing = [h for h in hooks if h not in self._dims]
        if missing:
            raise DataError(f"the activation cache at {self.path} has no activations for "
                            f"{missing}; it holds {self.hooks}")

    def check_model(self, model) -> None:
        """DataError unless `model` (a HookedLM or a fingerprint string) made this cache."""
        asked = model if isinstance(model, str) else fmt.model_fingerprint(model)
        name = model if isinstance(model, str) else getattr(model, "name", "?")
        if asked != self.model_fingerprint:
            raise DataError(
                f"the activation cache at {self.path} was made from model "
                f"{self.model_name!r} (fingerprint {self.model_fingerprint}, "
                f"{self.manifest['model']['dtype']}), not {name!r} (fingerprint {asked}): other "
                "weights, config or dtype; cache activations for this model in a new folder")

    # ---- raw access -----------------------------------------------------------------------
    def _map(self, what: str, k: int) -> np.ndarray:
        """Shard k of hook `what` (or of the token ids, what=""), memory-mapped and checked."""
        if (what, k) not in self._maps:
            if len(self._maps) >= 64:
                self._maps.pop(next(iter(self._maps)))
            self._maps[what, k] = self._open_map(what, k)
        return self._maps[what, k]

    def _open_map(self, what: str, k: int) -> np.ndarray:
        start, stop = fmt.shard_range(self.manifest, k)
        n_ctx = stop - start
        if what == "":
            return fmt.load_npy(fmt.tokens_path(self.path, k), (n_ctx, self.context_length),
                                np.dtype(np.int32))
        shape = (n_ctx * self.rows_per_context, self._dims[what])
        return fmt.load_npy(fmt.acts_path(self.path, what, k), shape, self._np_dtype)

    def context_tokens(self, context_idx) -> torch.Tensor:
        """Full token ids (n, context_length), BOS included, of the given contexts: the text
        every cached row came from."""
        return torch.from_numpy(self._in_order("", context_idx).astype(np.int64))

    def context_activations(self, context_idx, hook: str) -> torch.Tensor:
        """float32 activations (n, rows_per_context, d) at `hook` of the given contexts (any
        order): [i, p] is context position first_position + p. For fetching a few contexts
        by index (e.g. a feature's examples), where `sequential` would read them all."""
        self.check_hooks([hook])
        acts = fmt.from_storage(self._in_order(hook, context_idx), self.dtype)
        return acts.float().reshape(-1, self.rows_per_context, self._dims[hook])

    def _in_order(self, what: str, context_idx) -> np.ndarray:
        """`_gather` for context indices in any order (checked to exist), in that order."""
        ids = np.atleast_1d(np.asarray(context_idx, dtype=np.int64))
        if ids.size == 0:
            raise DataError("no context indices given")
        if ids.min() < 0 or ids.max() >= self.n_contexts:
            raise DataError(f"context indices must be in 0..{self.n_contexts - 1}")
        order = np.argsort(ids, kind="stable")
        got = self._gather(what, ids[order])
        if np.array_equal(order, np.arange(len(ids))):
            return got
        out = np.empty_like(got)
        out[order] = got
        return out

    def _gather(self, what: str, ids: np.ndarray) -> np.ndarray:
        """Rows of the given contexts (ascending indices), in that order: (n, rows_per_context, d)
        for a hook, (n, context_length) for tokens (what=""). One copy out of the maps."""
        if ids.size > 1 and np.any(np.diff(ids) < 0):
            raise ValueError("context indices must be ascending")
        shard_of = ids // self.shard_contexts
        bounds = np.searchsorted(shard_of, np.unique(shard_of), side="right")
        out, start = None, 0
        for stop in bounds:
            k = int(shard_of[start])
            src = self._map(what, k)
            src = src if what == "" else src.reshape(-1, self.rows_per_context, src.shape[-1])
            if out is None:
                out = np.empty((len(ids), *src.shape[1:]), src.dtype)
            np.take(src, ids[start:stop] - k * self.shard_contexts, axis=0, out=out[start:stop])
            start = stop
        return out

    def load_contexts(self, ids: np.ndarray, hooks: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """One (len(ids) * rows_per_context, d) tensor per hook, in the stored dtype, for
        ascending context indices `ids`."""
        return tuple(fmt.from_storage(self._gather(h, ids), self.dtype).reshape(-1, self._dims[h])
                     for h in hooks)

    # ---- readers --------------------------------------------------------------------------
    def batches(self, hook: str, batch_size: int, *, target: str | None = None, seed: int = 0,
                epochs: int | None = None, buffer_mb: float = 256) -> ShuffledBatches:
        """Shuffled float32 batches x (B, d) at `hook`, or (x, y) pairs with y at `target`
        (same tokens, for transcoders). Memory: one window of about `buffer_mb` MiB. Resume a
        training run with `iter_from(step)`; see saelab.data.cache.shuffle for the exact order."""
        hooks = [hook] if target is None else [hook, target]
        self.check_hooks(hooks)
        if self.n_contexts == 0:
            raise DataError(f"the activation cache at {self.path} holds no contexts yet")
        dims = [self._dims[h] for h in hooks]
        window = window_contexts_for(buffer_mb, self.rows_per_context, dims)
        return ShuffledBatches(lambda ids: self.load_contexts(ids, hooks), self.n_contexts,
                               self.rows_per_context, batch_size, window, seed=seed,
                               epochs=epochs, dims=dims)

    def sequential(self, hooks: str | Sequence[str] | None = None,
                   batch_size: int = 4096) -> Iterator[CacheChunk]:
        """Every row in cache order, in chunks of whole contexts (about `batch_size` rows),
        with token ids, context indices and positions; acts are float32."""
        names = self.hooks if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
        self.check_hooks(names)
        R, step = self.rows_per_context, max(1, batch_size // self.rows_per_context)
        positions = torch.arange(self.first_position, self.context_length)
        for start in range(0, self.n_contexts, step):
            ids = np.arange(start, min(start + step, self.n_contexts))
            acts = dict(zip(names, (a.float() for a in self.load_contexts(ids, names))))
            tokens = self.context_tokens(ids)[:, self.first_position:]
            yield CacheChunk(acts[names[0]] if isinstance(hooks, str) else acts,
                             tokens.reshape(-1), torch.from_numpy(ids).repeat_interleave(R),
                             positions.repeat(len(ids)))


def open_cache(path: str | Path, *, model=None, hooks: str | Sequence[str] | None = None,
               require_complete: bool = True) -> ActivationCache:
    """Open the cache in `path`. With `model` (HookedLM or fingerprint) or `hooks`, a cache
    made from another model or without those hooks is a DataError; so is an unfinished one
    unless `require_complete=False`."""
    cache = ActivationCache(path)
    if require_complete and not cache.complete:
        raise DataError(f"the activation cache at {cache.path} is unfinished "
                        f"({cache.n_contexts} contexts so far); run cache_activations again "
                        "with the same arguments to resume it")
    if hooks is not None:
        cache.check_hooks([hooks] if isinstance(hooks, str) else list(hooks))
    if model is not None:
        cache.check_model(model)
    return cache
