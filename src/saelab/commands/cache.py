"""`saelab cache --hooks H [H ...] --out DIR`: an activation cache on disk, one LM pass for every
hook: e.g. held-out text for `saelab dashboard --cache`, or a training set to reuse across runs.
Writes DIR: manifest.json, tokens/<shard>.npy (the contexts) and acts/<hook>/<shard>.npy.
Interrupted, the same command resumes where it stopped; an existing complete cache is reused."""

from __future__ import annotations

import argparse
import inspect

from saelab.commands import options
from saelab.data.cache import cache_activations
from saelab.data.corpus import token_contexts
from saelab.lm.resolve import fit_context_length, load_lm

CACHE_CONTEXTS = 512
_WRITE_DEFAULTS = {k: p.default for k, p in inspect.signature(cache_activations).parameters.items()}


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="write an activation cache (several hooks, one LM pass; resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", required=True, help="TransformerLens hook names, e.g. blocks.0.hook_resid_post")
    options.add_out(p, None, required=True)
    options.add_cache_dtype(p, _WRITE_DEFAULTS["dtype"])
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g)
    g.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                   help="documents to read (default: heldout, what interpretation should look at)")
    g.add_argument("--cache-contexts", type=options.positive_int, default=CACHE_CONTEXTS,
                   help=f"contexts to cache (default: {CACHE_CONTEXTS})")
    options.add_context_length(g, 128)
    options.add_lm_batch_size(g, _WRITE_DEFAULTS["batch_size"])
    options.add_include_bos(g)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm = load_lm(args.model, device=args.device, dtype=args.dtype)
    length = fit_context_length(lm, args.context_length)
    contexts = token_contexts(args.source, lm.tokenizer, length, split=args.split, max_contexts=args.cache_contexts)
    cache = cache_activations(lm, contexts, args.hooks, args.out, dtype=args.cache_dtype, batch_size=args.lm_batch_size,
                              drop_bos=not args.include_bos, meta={"source": args.source, "split": args.split})
    print(f"{cache.path}: {cache.n_contexts} contexts, {cache.n_tokens} tokens at {', '.join(args.hooks)} "
          f"({args.cache_dtype})")
    return 0
