"""Write an activation cache: one LM forward per batch feeds every hook, shard by shard.

Memory is bounded by construction: the only buffers are two shards' activations per hook
(`shard_contexts` contexts each, preallocated once: one filled by the LM while a writer
thread saves the other) and one forward batch, whatever the number of tokens cached.
Contexts may come as one (n, context_length) array or as any iterable of rows or blocks of
rows, so a caller can stream them.

Resuming: run the same call again. Shards the manifest counts are skipped (their stored token
ids are compared with the contexts given, so a resume on other data is an error), and writing
continues with the next shard.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

import saelab.data.cache.format as fmt
from saelab.atomic import write_json
from saelab.errors import ConfigError, DataError, Interrupted, SaelabError
from saelab.progress import progress_bar

SHARD_BYTES = 32 * 2**20  # default shard size, all hooks together (two shards are in memory)

def _identity(m: dict) -> dict:
    """What a resumed run must share with the cache (the model's name or folder may move)."""
    keys = ("tokenizer_fingerprint", "hooks", "context_length", "dtype", "drop_bos",
            "shard_contexts")
    return {"model fingerprint": (m.get("model") or {}).get("fingerprint"),
            **{k: m.get(k) for k in keys}}


class ContextStream:
    """Token contexts from an array (n, L) or an iterable of (L,) rows / (b, L) blocks,
    handed out `take(n)` at a time as int64 tensors."""

    def __init__(self, contexts):
        self.total = len(contexts) if isinstance(contexts, (torch.Tensor, np.ndarray)) else None
        if self.total is not None and (contexts.ndim != 2 or self.total == 0):
            raise DataError(f"contexts must be a non-empty (n_contexts, context_length) array, "
                            f"got shape {tuple(contexts.shape)}")
        self._blocks: Iterator = iter([contexts] if self.total is not None else contexts)
        self._rest: torch.Tensor | None = None
        self.context_length: int | None = None

    def _next_block(self) -> torch.Tensor | None:
        block = next(self._blocks, None)
        if block is None:
            return None
        t = torch.as_tensor(np.asarray(block) if not isinstance(block, torch.Tensor) else block)
        t = t.unsqueeze(0) if t.ndim == 1 else t
        if t.ndim != 2 or t.dtype.is_floating_point:
            raise DataError(f"each context must be a row of integer token ids; got a block of "
                            f"shape {tuple(t.shape)} {t.dtype}")
        if self.context_length is None:
            self.context_length = t.shape[1]
        elif t.shape[1] != self.context_length:
            raise DataError(f"contexts must all have length {self.context_length}; got one of "
                            f"{t.shape[1]}")
        return t.long().cpu()

    def peek_length(self) -> int:
        if self.context_length is None:
            self._rest = self._next_block()
            if self._rest is None:
                raise DataError("no contexts to cache: the context iterable is empty")
        return self.context_length

    def take(self, n: int) -> torch.Tensor | None:
        """Up to n contexts (fewer only at the end), or None when there are no more."""
        parts, have = [], 0
        while have < n:
            block = self._rest if self._rest is not None else self._next_block()
            self._rest = None
            if block is None:
                break
            parts.append(block[: n - have])
            if block.shape[0] > n - have:
                self._rest = block[n - have:]
            have += parts[-1].shape[0]
        return torch.cat(parts) if parts else None


def _header(lm, hooks: list[str], context_length: int, dtype: str, drop_bos: bool,
            shard_contexts: int | None, meta: dict | None) -> dict:
    first = 1 if drop_bos else 0
    if context_length <= first:
        raise ConfigError(f"context_length {context_length} leaves no positions after dropping BOS")
    dims = [lm.hook_dim(h) for h in hooks]
    rows = context_length - first
    if shard_contexts is None:
        per_context = rows * sum(dims) * fmt.DTYPES[dtype][1].itemsize
        shard_contexts = max(1, SHARD_BYTES // per_context)
    if shard_contexts < 1:
        raise ConfigError(f"shard_contexts must be >= 1, got {shard_contexts}")
    param = next(lm.model.parameters())
    return {
        "format": fmt.FORMAT, "version": fmt.VERSION,
        "model": {"name": lm.name, "fingerprint": fmt.model_fingerprint(lm),
                  "model_type": lm.model.config.model_type, "dtype": str(param.dtype)},
        "tokenizer_fingerprint": fmt.tokenizer_fingerprint(lm.tokenizer),
        "hooks": [{"name": h, "dim": d} for h, d in zip(hooks, dims)],
        "context_length": context_length, "drop_bos": drop_bos, "first_position": first,
        "rows_per_context": rows, "bos_token_id": lm.bos_token_id,
        "dtype": dtype, "storage_dtype": str(fmt.DTYPES[dtype][1]),
        "shard_contexts": int(shard_contexts), "meta": meta or {},
        "shards_done": 0, "contexts_done": 0, "tokens_done": 0, "complete": False,
    }


def _start_or_resume(root: Path, header: dict, auto_shards: bool) -> dict:
    """The manifest to continue from: a fresh one, or the existing one if it matches (then
    files it does not list, left by an interrupted write, are removed)."""
    if not (root / fmt.MANIFEST).exists():
        if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise DataError(f"{root} exists and is not an activation cache; give an empty or "
                            "new folder")
        write_json(root / fmt.MANIFEST, header)
        return header
    manifest = fmt.read_manifest(root)
    if auto_shards:  # the size picked last time stands, even if the default changed since
        header = {**header, "shard_contexts": manifest.get("shard_contexts")}
    asked = _identity(header)
    for key, cached in _identity(manifest).items():
        fmt.check_same(key.replace("_", " "), cached, asked[key], root,
                       "resume with the same model, hooks and options, or use a new folder")
    manifest["meta"] = header["meta"] or manifest.get("meta", {})
    _remove_unlisted(root, manifest)
    return manifest


def _remove_unlisted(root: Path, manifest: dict) -> None:
    listed = {fmt.shard_file(k) for k in range(manifest["shards_done"])}
    folders = [root / "tokens"] + [root / "acts" / h["name"] for h in manifest["hooks"]]
    for folder in folders:
        for path in folder.glob("*") if folder.is_dir() else ():
            if path.is_file() and path.name not in listed:
                path.unlink()


def _skip_done(stream: ContextStream, manifest: dict, root: Path) -> None:
    """Consume the contexts of finished shards, checking they are the ones cached (against
    the stored token ids: 4 bytes a token, cheap beside the activations)."""
    for k in range(manifest["shards_done"]):
        start, stop = fmt.shard_range(manifest, k)
        ctx = stream.take(stop - start)
        stored = fmt.load_npy(fmt.tokens_path(root, k), (stop - start, manifest["context_length"]),
                              np.dtype(np.int32))
        if ctx is None or ctx.shape[0] != stop - start or not np.array_equal(ctx.numpy(), stored):
            raise DataError(f"the contexts given differ from those already cached in {root} "
                            f"(shard {k}, contexts {start}..{stop}); resume with the same "
                            "contexts in the same order, or use a new folder")


class _ShardBuffers:
    """One shard's activations per hook, preallocated once as numpy arrays (saved as .npy as
    they are), with torch views for the LM to copy into."""

    def __init__(self, manifest: dict):
        self.dtype = manifest["dtype"]
        rows = manifest["shard_contexts"] * manifest["rows_per_context"]
        np_dtype = fmt.DTYPES[self.dtype][1]
        self.arrays = {h["name"]: np.empty((rows, h["dim"]), np_dtype) for h in manifest["hooks"]}
        # torch views of the same memory in the cached dtype: copy_ converts on the fly
        self.views = {h: fmt.from_storage(a, self.dtype) for h, a in self.arrays.items()}
        self.first = manifest["first_position"]

    def fill(self, lm, ctx: torch.Tensor, batch_size: int, bar) -> int:
        """Run the LM over a shard's contexts, copying each batch's activations straight
        into the buffers (one copy, dtype converted on the way); returns the rows filled."""
        row, hooks = 0, list(self.arrays)
        for i in range(0, ctx.shape[0], batch_size):
            cache = lm.run_with_cache(ctx[i: i + batch_size], hooks)
            for hook, act in cache.items():
                b, length, d = act.shape
                dest = self.views[hook][row: row + b * (length - self.first)]
                dest.view(b, length - self.first, d).copy_(act[:, self.first:])
            row += b * (length - self.first)
            bar.update(b)
        return row


def _commit(bufs: _ShardBuffers, rows: int, ctx: torch.Tensor, manifest: dict, root: Path) -> None:
    """Write shard files atomically, then count the shard in the manifest (atomically too)."""
    k = manifest["shards_done"]
    for hook, arr in bufs.arrays.items():
        fmt.save_npy(fmt.acts_path(root, hook, k), arr[:rows])
    fmt.save_npy(fmt.tokens_path(root, k), ctx.to(torch.int32).numpy())
    manifest["shards_done"] += 1
    manifest["contexts_done"] += ctx.shape[0]
    manifest["tokens_done"] += rows
    write_json(root / fmt.MANIFEST, manifest)


def cache_complete(out_dir: str | Path) -> bool:
    """True when `out_dir` holds a finished activation cache (as seen from this process: on a
    node that does not share the writer's filesystem it is not there)."""
    try:
        return bool(fmt.read_manifest(Path(out_dir)).get("complete"))
    except (OSError, ValueError, SaelabError):
        return False


def cache_activations(lm, contexts, hooks: str | Sequence[str], out_dir: str | Path, *,
                      dtype: str | torch.dtype = "float32", batch_size: int = 32,
                      drop_bos: bool = True, shard_contexts: int | None = None,
                      meta: dict | None = None, progress: bool | None = None):
    """Cache the activations of `lm` (a HookedLM) at `hooks` on `contexts` into `out_dir`.

    contexts: (n, context_length) int array, or an iterable of rows / (b, context_length)
    blocks (streamed). drop_bos: leave out position 0 of every context (where packing puts
    BOS; its activations have outsized norms). shard_contexts: contexts per shard (default:
    about 32 MiB of activations per shard). meta: free-form JSON recorded in the manifest
    (e.g. the corpus and split). Returns the finished cache, opened (`ActivationCache`).
    Calling again on the same folder resumes an interrupted run."""
    from saelab.data.cache.read import open_cache

    hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
    if not hooks:
        raise ConfigError("give at least one hook name")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    root, name = Path(out_dir), fmt.dtype_name(dtype)
    stream = ContextStream(contexts)
    header = _header(lm, hooks, stream.peek_length(), name, drop_bos, shard_contexts, meta)
    manifest = _start_or_resume(root, header, auto_shards=shard_contexts is None)
    _skip_done(stream, manifest, root)
    if not manifest["complete"]:
        try:
            _write_remaining(lm, stream, manifest, root, batch_size, progress)
        except KeyboardInterrupt:  # the shard being written is finished first (the writer is waited for)
            raise Interrupted(f"caching activations into {root} stopped with {manifest['contexts_done']} contexts "
                              "cached (in whole shards, kept): rerunning the same command resumes from there") from None
    elif stream.take(1) is not None:
        raise DataError(f"the cache at {root} is complete with {manifest['contexts_done']} "
                        "contexts, and more were given; use a new folder")
    return open_cache(root)


def _write_remaining(lm, stream: ContextStream, manifest: dict, root: Path, batch_size: int,
                     progress: bool | None) -> None:
    """Fill shard buffers with the LM while a writer thread saves the previous shard: two
    buffer sets, so disk writes (which release the GIL) overlap the next forward passes. The
    one writer commits shards in order; its errors surface here."""
    bufs: list[_ShardBuffers] = []
    pending: list[Future | None] = [None, None]
    with ThreadPoolExecutor(max_workers=1) as writer, progress_bar(
            total=stream.total, initial=manifest["contexts_done"], unit="ctx",
            desc="caching activations", enabled=progress) as bar:
        k = 0
        while (ctx := stream.take(manifest["shard_contexts"])) is not None:
            slot = k % 2
            if pending[slot] is not None:
                pending[slot].result()
            if len(bufs) <= slot:  # the second set only when there is a second shard
                bufs.append(_ShardBuffers(manifest))
            rows = bufs[slot].fill(lm, ctx, batch_size, bar)
            pending[slot] = writer.submit(_commit, bufs[slot], rows, ctx, manifest, root)
            k += 1
        for job in pending:
            if job is not None:
                job.result()
    if manifest["contexts_done"] == 0:
        raise DataError("no contexts to cache")
    manifest["complete"] = True
    write_json(root / fmt.MANIFEST, manifest)
