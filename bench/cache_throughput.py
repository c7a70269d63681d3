"""Activation-cache throughput: the bare LM forward to the hooks, caching (forward + write),
reading shuffled batches from disk, and live batches.

Runs on the offline default LM when it is built (`saelab.lm.default`), else on a random-init
GPT-NeoX of the same shape, on stdlib text (or random tokens). Each timing is the best of
`--repeats` runs, interleaved, since the machine is shared. The caching overhead is
(caching time - bare forward time) / bare forward time; the target is <= 15%.

    OMP_NUM_THREADS=1 python bench/cache_throughput.py [--contexts 512] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from saelab.data.cache import cache_activations, live_batches
from saelab.errors import MissingFileError
from saelab.lm.hooked import HookedLM


def load_lm(tmp: Path) -> tuple[HookedLM, str]:
    try:
        from saelab.lm.default import default_lm_path
        return HookedLM.load(default_lm_path(build=False)), "default LM"
    except (ImportError, MissingFileError):
        from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models

        cfg = GPTNeoXConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=512,
                            max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "lm")
        tok = Tokenizer(models.WordLevel({"<bos>": 0, "<unk>": 1}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                eos_token="<bos>").save_pretrained(tmp / "lm")
        return HookedLM.load(tmp / "lm"), "random-init GPT-NeoX 2x128 (default LM not built)"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="contexts per LM forward")
    ap.add_argument("--hooks", nargs="+", default=["blocks.0.hook_resid_post",
                                                   "blocks.1.ln2.hook_normalized",
                                                   "blocks.1.hook_mlp_out"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--train-batch", type=int, default=4096, help="rows per shuffled batch")
    ap.add_argument("--read-batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-"))
    try:
        lm, what = load_lm(tmp)
        ctx = contexts_for(lm, args.contexts, random_tokens=what != "default LM")
        rows = run(lm, ctx, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_tok = ctx.numel()
    print(f"\nmodel: {what}; {ctx.shape[0]} contexts x {ctx.shape[1]} tokens = {n_tok} tokens; "
          f"hooks: {', '.join(args.hooks)}; dtype {args.dtype}; {args.threads} thread(s)\n")
    print(f"| {'stage':<48} | {'seconds':>8} | {'rate':>30} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 32}|")
    for name, seconds, rate in rows:
        print(f"| {name:<48} | {seconds:8.3f} | {rate:>30} |")
    bare, cached = rows[0][1], rows[1][1]
    print(f"\ncaching overhead over the bare forward: {100 * (cached - bare) / bare:+.1f}% "
          f"(target <= 15%)")


def run(lm: HookedLM, ctx: torch.Tensor, args, tmp: Path) -> list[tuple[str, float, str]]:
    hooks, B, n_tok = args.hooks, args.batch_size, ctx.numel()

    def bare():
        for i in range(0, ctx.shape[0], B):
            lm.run_with_cache(ctx[i:i + B], hooks)

    def cache(k=[0]):  # noqa: B006 - a counter for fresh folders
        k[0] += 1
        cache_activations(lm, ctx, hooks, tmp / f"cache{k[0]}", dtype=args.dtype,
                          batch_size=B, progress=False)

    bare()  # warm-up
    t_bare, t_cache = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_bare = min(t_bare, timed(bare))
        t_cache = min(t_cache, timed(cache))
    store = cache_activations(lm, ctx, hooks, tmp / "cache1", dtype=args.dtype, batch_size=B)
    per_epoch = store.n_tokens // args.train_batch
    n_read = min(args.read_batches, 3 * per_epoch)

    def read(target=None):
        batches = store.batches(hooks[0], args.train_batch, target=target, seed=0)
        return lambda: sum(1 for _ in islice(batches, n_read))

    t_read = min(timed(read()) for _ in range(args.repeats))
    t_pair = min(timed(read(hooks[-1])) for _ in range(args.repeats))
    live = live_batches(lm, ctx, hooks[0], args.train_batch, target=hooks[-1],
                        forward_batch_size=B, seed=0)
    n_live = max(1, per_epoch)
    t_live = timed(lambda: sum(1 for _ in islice(live, n_live)))
    def tok(t, n=n_tok):
        return f"{n / t:,.0f} tok/s"

    def bat(t, n):
        return f"{n / t:,.1f} batch/s ({n * args.train_batch / t / 1e6:.2f}M rows/s)"
    return [
        ("bare LM forward to the hooks (early stop)", t_bare, tok(t_bare)),
        (f"caching: forward + write {len(hooks)} hooks", t_cache, tok(t_cache)),
        (f"shuffled disk batches of {args.train_batch} (x)", t_read, bat(t_read, n_read)),
        (f"shuffled disk batches of {args.train_batch} (x, y)", t_pair, bat(t_pair, n_read)),
        (f"live batches of {args.train_batch} (x, y): forward + shuffle", t_live,
         tok(t_live, n_live * args.train_batch)),
    ]


if __name__ == "__main__":
    main()
