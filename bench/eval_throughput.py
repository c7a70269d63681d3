"""Throughput of the loss-recovered evaluation (saelab.evals.downstream.evaluate_downstream).

One evaluation = the mean pass (activation means) + per batch: a clean pass, a zero- and a
mean-ablation pass per replaced hook, and one pass per SAE. Uses the offline default LM when it
is already built (it is never built here), else a random-init model of its size
(bench.cache_throughput.load_lm): the same cost per token. The
SAEs are random-init top-k (d_sae 4096, k 32): their loss numbers only show the plumbing.

Rows: tokens/s (evaluated tokens / wall time) of one SAE, four SAEs at one hook (sharing the
clean and ablation passes), and a transcoder, each against the bare clean forward's tokens/s.

    python -m bench.eval_throughput [--contexts 64] [--batch-size 16] [--device cuda]
    (python -m bench runs its rows: 64 contexts, batch 16, on the CPU)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench import row, timed  # noqa: E402
from bench.cache_throughput import load_lm  # noqa: E402
from saelab.evals.downstream import evaluate_downstream  # noqa: E402
from saelab.lm.hooked import HookedLM  # noqa: E402
from saelab.sae import SAE  # noqa: E402


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


def measure(n_ctx: int, bs: int, device: str = "cpu") -> list[dict]:
    """The rows: each case's evaluation against the clean forward, on `device`."""
    with tempfile.TemporaryDirectory() as tmp:
        lm, what = load_lm(Path(tmp), device)
    toks = _tokens(lm, n_ctx, real=what == "default LM")
    n_tok, d, hook = toks.numel(), lm.d_model, "blocks.0.hook_resid_post"
    cases = {
        "1 SAE (topk 4096) @ resid_post": [_sae(d, hook)],
        "4 SAEs (topk 4096) @ resid_post": [_sae(d, hook, seed=i) for i in range(4)],
        "1 transcoder ln2 -> mlp_out": [_sae(d, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")],
    }
    cases = {name: [s.to(device) for s in saes] for name, saes in cases.items()}
    evaluate_downstream(lm, cases["1 SAE (topk 4096) @ resid_post"], toks[:bs], progress=False)  # warm-up
    with torch.no_grad():
        clean, _, _ = timed(lambda: [lm.forward(b) for b in toks.split(bs)], device)
    out = []
    for name, saes in cases.items():
        secs, mib, _ = timed(lambda: evaluate_downstream(lm, saes, toks, batch_size=bs, progress=False), device)
        passes = 1 + 1 + 2 + len(saes)  # means, clean, zero, mean, SAEs
        out.append(row(f"loss recovered: {name} ({what}, {n_tok} tokens)", n_tok / secs,
                       "tokens/s (ratio: of the clean forward's)", "clean LM forward", n_tok / clean,
                       peak_mib=mib, note=f"{passes} passes per batch, batch {bs}, {device}"))
    return out


def rows(quick: bool) -> list[dict]:
    return measure(*((4, 2) if quick else (64, 16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from bench.__main__ import print_table

    print_table(measure(args.contexts, args.batch_size, args.device))


if __name__ == "__main__":
    main()
