"""Activation cache: LM activations at one or more hooks, on disk or live, as training batches.

    cache = cache_activations(lm, contexts, ["blocks.0.hook_resid_post"], "acts/", dtype="bf16")
    cache = open_cache("acts/", model=lm, hooks="blocks.0.hook_resid_post")
    batches = cache.batches("blocks.0.hook_resid_post", 4096, seed=0)      # for GroupTrainer
    pairs = cache.batches("blocks.0.ln2.hook_normalized", 4096, target="blocks.0.hook_mlp_out")
    for chunk in cache.sequential("blocks.0.hook_resid_post"): ...          # with token ids
    live = live_batches(lm, contexts, "blocks.0.hook_resid_post", 4096)     # no disk

Writing (`write`), the layout and fingerprints (`format`), reading (`read`) and the
shuffle shared by disk and live batches (`shuffle`) live in their own modules.
"""

from saelab.data.cache.format import dtype_name, model_fingerprint, tokenizer_fingerprint
from saelab.data.cache.read import ActivationCache, CacheChunk, open_cache
from saelab.data.cache.shuffle import LiveLoader, ShuffledBatches, live_batches
from saelab.data.cache.write import cache_activations, cache_complete

__all__ = ["ActivationCache", "CacheChunk", "LiveLoader", "ShuffledBatches", "cache_activations",
           "cache_complete",
           "dtype_name", "live_batches", "model_fingerprint", "open_cache", "tokenizer_fingerprint"]
