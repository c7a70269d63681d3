"""Activation-cache throughput: caching (forward + write) against the bare LM forward to the
hooks, the bytes written against the disk's sequential write rate, and shuffled batches read
back from disk (x, and (x, y) pairs) against the disk's sequential read rate.

The disk's rates are measured here on a 256 MiB file in the same temporary folder: written and
fsynced, then read after its pages are dropped from the page cache (posix_fadvise DONTNEED), as
are the cache's files before each shuffled read, so reads come from the disk, not from memory
(where the kernel cannot drop them, the note says so). Runs on the offline default LM when it is
built (`saelab.lm.default`), else on a random-init GPT-NeoX of the same shape.

    python -m bench.cache_throughput [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from bench import PeakMemory, row
from saelab.data.cache import cache_activations
from saelab.errors import MissingFileError
from saelab.lm.hooked import HookedLM


def load_lm(tmp: Path, device: str = "cpu") -> tuple[HookedLM, str]:
    """The offline default LM if it is built, else a random-init model of its size (saved to `tmp`
    with a word-level tokenizer: the same cost per token), and which of the two it is."""
    try:
        from saelab.lm.default import default_lm_path
        return HookedLM.load(default_lm_path(build=False), device=device), "default LM"
    except (ImportError, MissingFileError):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

        from saelab.lm.default import DefaultLMConfig

        c = DefaultLMConfig()
        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                            num_attention_heads=c.n_heads, intermediate_size=c.d_mlp,
                            max_position_embeddings=c.context_length, rotary_pct=0.25, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "lm")
        tok = Tokenizer(models.WordLevel({"<bos>": 0, "<unk>": 1}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # text gives a token per word (all <unk>)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                eos_token="<bos>").save_pretrained(tmp / "lm")
        return (HookedLM.load(tmp / "lm", device=device),
                "random-init model of the default LM's size (the default LM is not built)")


def contexts_for(lm: HookedLM, n: int, random_tokens: bool) -> torch.Tensor:
    length = lm.context_length
    if not random_tokens:
        from saelab.data.corpus import token_contexts
        return token_contexts("stdlib", lm.tokenizer, length, max_contexts=n, progress=False)
    ctx = torch.randint(2, lm.d_vocab, (n, length), generator=torch.Generator().manual_seed(0))
    ctx[:, 0] = 0
    return ctx


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_page_cache(root: Path) -> bool:
    """Flush and drop the page-cache pages of every file under root; False where that failed."""
    ok = hasattr(os, "posix_fadvise")
    for path in [root] if root.is_file() else root.rglob("*"):
        if ok and path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                ok = False
            finally:
                os.close(fd)
    return ok


def disk_rates(tmp: Path, mib: int) -> tuple[float, float, bool]:
    """Sequential write (fsynced) and cold read rates, MiB/s, of a `mib` MiB file under tmp."""
    block = os.urandom(2**20)
    path = tmp / "disk-probe"
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    write = mib / (time.perf_counter() - start)
    cold = drop_page_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(8 * 2**20):
            pass
    read = mib / (time.perf_counter() - start)
    path.unlink()
    return write, read, cold


def rows(quick: bool) -> list[dict]:
    n_ctx, hooks, batch, repeats = (16, HOOKS[:2], 256, 1) if quick else (512, HOOKS, 4096, 3)
    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-cache-"))
    try:
        lm, what = load_lm(tmp)
        ctx = contexts_for(lm, n_ctx, random_tokens=what != "default LM")
        write, read, cold = disk_rates(tmp, 16 if quick else 256)
        return measure(lm, ctx, hooks, batch, repeats, tmp, (write, read, cold), what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HOOKS = ["blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]


def measure(lm: HookedLM, ctx, hooks, batch: int, repeats: int, tmp: Path, disk, what: str) -> list[dict]:
    write, read, cold = disk
    n_tok, B = ctx.numel(), 32

    def bare():
        for i in range(0, ctx.shape[0], B):
            lm.run_with_cache(ctx[i:i + B], hooks)

    def cache(k=[0]):  # noqa: B006 - a counter for fresh folders
        k[0] += 1
        shutil.rmtree(tmp / f"cache{k[0] - 1}", ignore_errors=True)
        cache_activations(lm, ctx, hooks, tmp / f"cache{k[0]}", batch_size=B, progress=False)

    bare()  # warm-up
    t_bare, t_cache = float("inf"), float("inf")
    with PeakMemory() as mem:
        for _ in range(repeats):
            t_bare = min(t_bare, timed(bare))
            t_cache = min(t_cache, timed(cache))
    store = cache_activations(lm, ctx, hooks, tmp / "kept", batch_size=B, progress=False)
    row_bytes = {h: store.dim(h) * 4 for h in hooks}
    n_read = max(1, min(100, 2 * store.n_tokens // batch))

    def read_rate(target=None) -> tuple[float, float]:
        best, peak = float("inf"), None
        for _ in range(repeats):
            drop_page_cache(tmp / "kept")
            with PeakMemory() as m:
                batches = store.batches(hooks[0], batch, target=target, seed=0)
                best = min(best, timed(lambda: sum(1 for _ in islice(batches, n_read))))
            peak = m.mib
        size = batch * n_read * (row_bytes[hooks[0]] + (row_bytes[target] if target else 0))
        return size / 2**20 / best, peak

    written = sum(row_bytes.values()) * store.n_tokens / 2**20
    x_rate, x_peak = read_rate()
    pair_rate, pair_peak = read_rate(hooks[-1])
    where = "cold (page cache dropped)" if cold else "page cache could not be dropped: reads may come from memory"
    shape = f"{what}, {ctx.shape[0]} contexts x {ctx.shape[1]} tokens"
    return [
        row(f"caching: forward + write {len(hooks)} hooks ({shape})", n_tok / t_cache,
            "tokens/s (ratio: of the bare forward's)", "bare LM forward to the hooks", n_tok / t_bare,
            peak_mib=mem.mib, note=f"best of {repeats}, interleaved"),
        row(f"caching: activations written ({len(hooks)} hooks, fp32)", written / t_cache,
            "MiB/s (ratio: of the disk's sequential write)", "disk sequential write (fsynced)", write,
            peak_mib=mem.mib, note="includes the LM forward"),
        row(f"shuffled batches of {batch} read from the cache (x)", x_rate,
            "MiB/s (ratio: of the disk's sequential read)", "disk sequential read", read,
            peak_mib=x_peak, note=where),
        row(f"shuffled batches of {batch} read from the cache (x, y)", pair_rate,
            "MiB/s (ratio: of the disk's sequential read)", "disk sequential read", read,
            peak_mib=pair_peak, note=where),
    ]


if __name__ == "__main__":
    from bench.__main__ import print_table

    print_table(rows(quick=False))
