"""Throughput of the one-pass feature scan (interpret/scan.py) against the bare SAE forward.

Random-init GPT-NeoX of the offline default's size (2 layers, d 128, vocab 4096, context 128)
and a top-k SAE (d_sae 4096, k 32) on blocks.1.hook_resid_post. Prints tokens/s for: the bare
SAE encode of precomputed activations, the scan of those activations, the LM forward to the
hook, and the live scan (LM + SAE + scan). Usage: python bench/bench_interpret_scan.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from saelab.interpret.scan import ScanConfig, scan_features  # noqa: E402
from saelab.interpret.sources import ContextBatch, context_batches  # noqa: E402
from saelab.lm.hooked import HookedLM  # noqa: E402
from saelab.sae import SAE  # noqa: E402


def _lm(device: str) -> HookedLM:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    return HookedLM(AutoModelForCausalLM.from_config(cfg).to(device))


def _rate(fn, n_tokens: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dev, hook = args.device, "blocks.1.hook_resid_post"
    lm = _lm(dev)
    sae = SAE(128, args.d_sae, arch="topk", k=32, hook_name=hook).to(dev)
    contexts = torch.randint(0, 4096, (args.contexts, 128), device=dev)
    n = contexts.numel()
    with torch.no_grad():
        acts = torch.cat([lm.run_with_cache(contexts[i:i + args.batch], [hook])[hook]
                          for i in range(0, len(contexts), args.batch)])
    cfg = ScanConfig()

    def pre_batches():
        for i in range(0, len(contexts), args.batch):
            yield ContextBatch(contexts[i:i + args.batch], None, acts[i:i + args.batch])

    def bare():
        with torch.no_grad():
            for i in range(0, len(contexts), args.batch):
                sae.encode(acts[i:i + args.batch])

    def lm_only():
        with torch.no_grad():
            for i in range(0, len(contexts), args.batch):
                lm.run_with_cache(contexts[i:i + args.batch], [hook])

    rates = {
        "bare SAE encode": _rate(bare, n, dev),
        "scan, precomputed acts": _rate(lambda: scan_features(pre_batches(), sae, config=cfg,
                                                               vocab_size=4096, progress=False), n, dev),
        "LM forward to hook": _rate(lm_only, n, dev),
        "scan, live LM": _rate(lambda: scan_features(context_batches(contexts, args.batch), sae, lm,
                                                      config=cfg, progress=False), n, dev),
    }
    print(f"device={dev} threads={torch.get_num_threads()} tokens={n} d_sae={args.d_sae} k=32")
    for name, rate in rates.items():
        print(f"{name:>24}: {rate:10.0f} tokens/s")


if __name__ == "__main__":
    main()
