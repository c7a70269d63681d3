"""The LM side of saelab against a bare forward: how much of a plain forward pass's throughput
caching and evaluation reach, and the shared-pass evaluation against the per-variant path it
replaced.

For each model (the offline default LM at its middle hook; SmolLM2-135M at
blocks.15.hook_resid_post when it is installed), on held-out stdlib contexts of 128 tokens:

    cache      cache_activations at the hook (early-stopping passes, disk writes included),
               tokens/s against the bare forward (HF model, logits, no hooks): > 1 where stopping
               early saves more than the hooks and the writes cost
    eval       evaluate_on_lm of one random top-k SAE: reconstruction pass + per batch the clean,
               zero, mean and SAE passes (+ the every-position splice where the outlier rule
               flags rows). Value: tokens/s per pass (tokens x passes / time); ratio: that over
               the bare forward's tokens/s, i.e. the fraction of the bare forward each pass
               reaches (the issue's "five passes at 65% of the bare-forward time" is 0.65)
    downstream evaluate_downstream against the per-variant path it replaced (a full forward per
               variant, log-softmax over the whole (batch, seq, vocab) logits): ratio = old time
               / new time; peak_mib: the new path's peak memory (bench.PeakMemory) (the old one's in the note)

`rows(quick)` returns one `bench.row` per row for `python -m bench`; each timing is the fastest of two runs (the machine may be shared).
Run standalone for a table:

    python bench/lm_side.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench import row, skipped, timed  # noqa: E402
from saelab.errors import SaelabError  # noqa: E402

MODELS = (("default", None), ("smollm2-135m", "blocks.15.hook_resid_post"))


def _best(fn, device: str, repeats: int = 2):
    """(the fastest of `repeats` timings, its peak MiB, fn's result): the machine may be shared."""
    return min((timed(fn, device) for _ in range(repeats)), key=lambda r: r[0])


def _mib(v: float | None) -> float | None:
    """Peak MiB rounded, or None where it cannot be read (no /proc)."""
    return None if v is None else round(v, 1)


def _bare_forward(lm, toks, batch_size):
    with torch.no_grad():
        for b in toks.split(batch_size):
            lm.model(input_ids=b.to(lm.device), use_cache=False)


def _per_variant_downstream(lm, saes, toks, batch_size):
    """The replaced path: one full forward per variant and (b, seq, vocab) float32 log-probs."""
    from saelab.evals.downstream import ablation_splice, hook_means, keep_bos, sae_splices
    from saelab.lm.hooked import next_token_logprobs, next_token_nll

    hook = saes[0].cfg.hook_name
    mean = hook_means(lm, toks, [hook], batch_size=batch_size, exclude_bos=True)[hook]
    variants = [{hook: ablation_splice("zero")}, {hook: ablation_splice("mean", mean)}]
    variants += [sae_splices(lm, sae) for sae in saes]
    ce = kl = 0.0
    with torch.no_grad():
        for b in toks.split(batch_size):
            logp = next_token_logprobs(lm.forward(b), 1)
            p = logp.exp()
            for splices in variants:
                logq = next_token_logprobs(lm.forward(b, {h: keep_bos(f) for h, f in splices.items()}), 1)
                ce += next_token_nll(logq, b, 1).double().sum().item()
                kl += (p * (logp - logq)).sum(-1).double().sum().item()
    return ce, kl


def _counting(lm):
    """Count the LM passes (every pass goes through run_with_cache)."""
    calls, run = [], lm.run_with_cache

    def counted(*a, **k):
        calls.append(1)
        return run(*a, **k)
    lm.run_with_cache = counted
    return calls


def _model_rows(name: str, hook: str | None, quick: bool, device: str) -> list[dict]:
    from saelab.data.cache import cache_activations
    from saelab.data.outliers import OutlierRule
    from saelab.evals.downstream import evaluate_downstream
    from saelab.evals.reconstruction import evaluate_on_lm
    from saelab.lm.resolve import heldout_contexts, load_lm
    from saelab.pipelines.train_lm import middle_hook
    from saelab.sae import SAE

    lm = load_lm(name, device=device)
    hook = hook or middle_hook(lm)
    small = name != "default"
    n, bs = (8 if quick else 16, 8) if small else (16 if quick else 64, 16)
    toks = heldout_contexts(lm, "stdlib", n_contexts=n, context_length=128)
    n_tok = toks.numel()
    torch.manual_seed(0)
    saes = [SAE(lm.d_model, 4 * lm.d_model, arch="topk", k=32, hook_name=hook).to(device)]
    _bare_forward(lm, toks[:bs], bs)  # warm-up
    bare_s, bare_peak, _ = _best(lambda: _bare_forward(lm, toks, bs), device)
    bare = n_tok / bare_s
    ref = ("bare forward (HF model, logits, no hooks)", round(bare, 1))
    where = f"{name} {hook}, {n} contexts x 128, batch {bs}, {device}"
    with tempfile.TemporaryDirectory() as tmp:
        cache_s, cache_peak, _ = _best(lambda: cache_activations(lm, toks, hook, tempfile.mkdtemp(dir=tmp),
                                                                 batch_size=bs, progress=False), device)
    rows = [row(f"lm_side/{name}/cache", round(n_tok / cache_s, 1), "tok/s", *ref, ratio=round(bare_s / cache_s, 3),
                peak_mib=_mib(cache_peak), note=f"cache_activations, early stop at the hook; {where}")]
    calls = _counting(lm)
    eval_s, eval_peak, _ = _best(lambda: evaluate_on_lm(lm, saes, toks, batch_size=bs, progress=False), device)
    del lm.run_with_cache
    per_pass = n_tok * len(calls) / 2 / eval_s
    rows.append(row(f"lm_side/{name}/eval", round(per_pass, 1), "tok/s per pass", *ref,
                    ratio=round(per_pass / bare, 3), peak_mib=_mib(eval_peak),
                    note=f"evaluate_on_lm, 1 SAE: {len(calls) / 2 / -(-n // bs):.1f} passes per batch; "
                         f"bare forward peak {_mib(bare_peak)} MiB; {where}"))
    off = OutlierRule(None)  # both paths: clean, zero, mean and SAE passes only
    new_s, new_peak, _ = _best(lambda: evaluate_downstream(lm, saes, toks, batch_size=bs, outliers=off,
                                                            exclude_bos=True, progress=False), device)
    old_s, old_peak, _ = _best(lambda: _per_variant_downstream(lm, saes, toks, batch_size=bs), device)
    rows.append(row(f"lm_side/{name}/downstream_vs_per_variant", round(n_tok / new_s, 1), "tok/s",
                    "per-variant full forwards (the path replaced)", round(n_tok / old_s, 1),
                    ratio=round(old_s / new_s, 3), peak_mib=_mib(new_peak),
                    note=f"evaluate_downstream, 1 SAE; per-variant path peak {_mib(old_peak)} MiB; {where}"))
    return rows


def rows(quick: bool = True, device: str = "cpu") -> list[dict]:
    """The rows of every model that can be loaded here (SmolLM2-135M is skipped, with a row
    saying so, where its wheel is not installed)."""
    out = []
    for name, hook in MODELS:
        try:
            out += _model_rows(name, hook, quick, device)
        except SaelabError as err:
            out.append(skipped(f"lm_side/{name}", str(err)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer contexts")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for r in rows(args.quick, args.device):
        print(f"{r['row']:44s} {r['value'] or '':>10} {r['unit']:15s} ratio {r['ratio'] or '':>7} "
              f"peak {r['peak_mib'] or '':>7} MiB  vs {r['reference']} {r['reference_value'] or ''}; {r['note']}")


if __name__ == "__main__":
    main()
