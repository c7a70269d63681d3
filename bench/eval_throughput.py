"""Throughput of the loss-recovered evaluation (saelab.evals.downstream.evaluate_downstream).

One evaluation = the mean pass (activation means) + per batch: a clean pass, a zero- and a
mean-ablation pass per replaced hook, and one pass per SAE. Uses the offline default LM when it
is already built (it is never built here), else a random-init GPT-NeoX of the same size
(2 layers, d 128, d_mlp 512, vocab 4096, context 128): the same cost per token. The
SAEs are random-init top-k (d_sae 4096, k 32): their loss numbers only show the plumbing.

Rows: tokens/s (evaluated tokens / wall time) of one SAE, four SAEs at one hook (sharing the
clean and ablation passes), and a transcoder, each against the bare clean forward's tokens/s.

    python -m bench.eval_throughput [--contexts 64] [--batch-size 16] [--device cuda]
    (python -m bench runs its rows: 64 contexts, batch 16, on the CPU)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench import PeakMemory, row  # noqa: E402
from saelab.evals.downstream import evaluate_downstream  # noqa: E402
from saelab.errors import MissingFileError  # noqa: E402
from saelab.lm.hooked import HookedLM  # noqa: E402
from saelab.sae import SAE  # noqa: E402


def _model(device: str) -> tuple[HookedLM, str]:
    from saelab.lm.default import DefaultLMConfig, default_lm_path

    try:
        return HookedLM.load(default_lm_path(build=False), device=device), "default LM (trained)"
    except MissingFileError:
        pass
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    c = DefaultLMConfig()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                        num_attention_heads=c.n_heads, intermediate_size=c.d_mlp,
                        max_position_embeddings=c.context_length, rotary_pct=0.25, tie_word_embeddings=False)
    return HookedLM(AutoModelForCausalLM.from_config(cfg).to(device)), "random-init model of the default LM's size"


def _tokens(lm: HookedLM, n: int, real: bool) -> torch.Tensor:
    """Held-out stdlib contexts for the trained default LM; random ids for a random model."""
    if real:
        from saelab.lm.resolve import heldout_contexts

        return heldout_contexts(lm, "stdlib", n)
    length = min(128, lm.context_length)
    toks = torch.randint(1, min(lm.d_vocab, lm.W_E.shape[0]), (n, length), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = lm.bos_token_id or 0
    return toks


def _sae(d: int, hook: str, hook_out: str | None = None, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    return SAE(d, 4096, arch="topk", k=32, hook_name=hook, hook_name_out=hook_out)


def _time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def rows(quick: bool) -> list[dict]:
    n_ctx, bs = (4, 2) if quick else (64, 16)
    lm, what = _model("cpu")
    toks = _tokens(lm, n_ctx, real=what.startswith("default"))
    n_tok, d, hook = toks.numel(), lm.d_model, "blocks.0.hook_resid_post"
    cases = {
        "1 SAE (topk 4096) @ resid_post": [_sae(d, hook)],
        "4 SAEs (topk 4096) @ resid_post": [_sae(d, hook, seed=i) for i in range(4)],
        "1 transcoder ln2 -> mlp_out": [_sae(d, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")],
    }
    evaluate_downstream(lm, cases["1 SAE (topk 4096) @ resid_post"], toks[:bs], progress=False)  # warm-up
    with torch.no_grad():
        clean, _ = _time(lambda: [lm.forward(b) for b in toks.split(bs)], "cpu")
    out = []
    for name, saes in cases.items():
        with PeakMemory() as mem:
            secs, _ = _time(lambda: evaluate_downstream(lm, saes, toks, batch_size=bs, progress=False), "cpu")
        passes = 1 + 1 + 2 + len(saes)  # means, clean, zero, mean, SAEs
        out.append(row(f"loss recovered: {name} ({what}, {n_tok} tokens)", n_tok / secs,
                       "tokens/s (ratio: of the clean forward's)", "clean LM forward", n_tok / clean,
                       peak_mib=mem.mib, note=f"{passes} passes per batch"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    lm, what = _model(args.device)
    toks = _tokens(lm, args.contexts, real=what.startswith("default"))
    n_tok = toks.numel()
    d, hook = lm.d_model, "blocks.0.hook_resid_post"
    print(f"model: {what}; {args.contexts} contexts x {toks.shape[1]} tokens = {n_tok} tokens; "
          f"batch {args.batch_size}; device {args.device}; torch threads {torch.get_num_threads()}")
    cases = {
        "1 SAE (topk 4096) @ resid_post": [_sae(d, hook)],
        "4 SAEs @ resid_post": [_sae(d, hook, seed=i) for i in range(4)],
        "1 transcoder ln2 -> mlp_out": [_sae(d, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")],
    }
    evaluate_downstream(lm, cases["1 SAE (topk 4096) @ resid_post"], toks[:args.batch_size], progress=False)  # warm-up
    with torch.no_grad():
        secs, _ = _time(lambda: [lm.forward(b) for b in toks.split(args.batch_size)], args.device)
    print(f"{'clean forward only':34s} {n_tok / secs:10,.0f} tok/s  (1 pass)")
    for name, saes in cases.items():
        saes = [s.to(args.device) for s in saes]
        secs, res = _time(lambda: evaluate_downstream(lm, saes, toks, batch_size=args.batch_size, progress=False), args.device)
        passes = 1 + 1 + 2 + len(saes)  # means, clean, zero, mean, SAEs
        r = res[0].to_dict()  # a DownstreamMetrics, flat as in metrics.json
        print(f"{name:34s} {n_tok / secs:10,.0f} tok/s  ({passes} passes, {secs:.2f} s; "
              f"CE clean {r['ce_clean']:.3f} zero {r['ce_zero']:.3f} sae {r['ce_sae']:.3f}, "
              f"loss rec. {r['loss_recovered']:.3f}, KL {r['kl']:.3f})")


if __name__ == "__main__":
    main()
