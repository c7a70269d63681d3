"""`saelab cache --hooks H [H ...] --out DIR`: an activation cache on disk, one LM pass for every
hook: e.g. held-out text for `saelab dashboard --cache`, or a training set to reuse across runs.
Interrupted, the same command resumes where it stopped; an existing complete cache is reused."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.data.cache import cache_activations
from saelab.data.corpus import token_contexts
from saelab.lm.resolve import load_lm


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="write an activation cache (several hooks, one LM pass; resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", required=True, help="TransformerLens hook names, e.g. blocks.0.hook_resid_post")
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--model", default=None, help="HF model folder or hub name (default: the offline default LM)")
    p.add_argument("--source", default="stdlib", help="text: 'stdlib', 'hf:NAME', a .txt/.jsonl file or a folder")
    p.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                   help="documents to read (default: heldout, what interpretation should look at)")
    p.add_argument("--contexts", type=int, default=512, help="contexts to cache (default: %(default)s)")
    p.add_argument("--context-length", type=int, default=128, help="tokens per context (at most the model's)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--keep-bos", action="store_true", help="also cache position 0 (BOS; dropped by default)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per LM forward pass")
    p.add_argument("--device", default="cpu", help="where the LM runs (cpu, cuda, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm = load_lm(args.model, device=args.device)
    length = min(args.context_length, lm.context_length)
    contexts = token_contexts(args.source, lm.tokenizer, length, split=args.split, max_contexts=args.contexts)
    cache = cache_activations(lm, contexts, args.hooks, args.out, dtype=args.dtype, batch_size=args.batch_size,
                              drop_bos=not args.keep_bos, meta={"source": args.source, "split": args.split})
    print(f"{cache.path}: {cache.n_contexts} contexts, {cache.n_tokens} tokens at {', '.join(args.hooks)} ({args.dtype})")
    return 0
