"""`saelab train`: an L1 x k x width sweep of SAEs (or sparse MLPs) on one hook of a language
model, in one pass over the data; evaluates every SAE and writes a run folder."""

from __future__ import annotations

from saelab.pipelines.train_lm import TABLE_COLUMNS, LMSweepConfig, run_lm_sweep, sweep_specs
from saelab.tables import format_rows


def add_sweep_args(p, *, steps: int, contexts: int, l1, ks, expansions) -> None:
    """Options shared by `train` and `quickstart` (the latter with its own defaults)."""
    p.add_argument("--model", help="HF model folder or hub name (default: the offline default LM, built on first use)")
    p.add_argument("--hook", help="TransformerLens hook name (default: resid_post of the middle layer)")
    p.add_argument("--hook-out", help="target hook for a sparse MLP / transcoder, e.g. blocks.0.hook_mlp_out")
    p.add_argument("--source", default="stdlib", help="text: 'stdlib', a .txt/.jsonl file or folder, or hf:NAME")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--contexts", type=int, default=contexts, help="training contexts to cache")
    p.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts for evaluation")
    p.add_argument("--expansion", type=float, nargs="+", default=expansions, help="widths as multiples of d_in")
    p.add_argument("--l1", type=float, nargs="*", default=l1, help="relu L1 coefficients")
    p.add_argument("--k", type=int, nargs="*", default=ks, help="topk k values")
    p.add_argument("--arch-k", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--decoder-norm", default="weighted", choices=["weighted", "unit"])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--live", action="store_true",
                   help="no activation cache on disk: batches come straight from the LM through a mixing buffer "
                        "(the same batches as from a cache; the LM runs again on a resumed run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the LM runs and the SAEs train: cpu, cuda, cuda:1, mps (default: cpu)")


def config_from_args(args) -> LMSweepConfig:
    specs = sweep_specs(args.expansion, args.l1, args.k, args.arch_k, args.lr, args.decoder_norm, args.steps)
    return LMSweepConfig(
        specs=specs, model=args.model, hook=args.hook, hook_out=args.hook_out, source=args.source,
        context_length=args.context_length, train_contexts=args.contexts, eval_contexts=args.eval_contexts,
        batch_size=args.batch_size, steps=args.steps, cache_dtype=args.cache_dtype, seed=args.seed,
        device=args.device, live=args.live,
    )


def register(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate a sweep of SAEs on a language model hook", description=__doc__)
    p.add_argument("--out", default="runs/train", help="run folder (resumes if it holds a checkpoint)")
    add_sweep_args(p, steps=1000, contexts=8192, l1=[1.0, 2.0, 4.0], ks=[16, 32], expansions=[8])
    p.set_defaults(func=run)


def run(args) -> int:
    entries = run_lm_sweep(config_from_args(args), args.out)
    print(format_rows(entries, TABLE_COLUMNS))
    print(f"\nrun folder: {args.out} (metrics.json, log.jsonl, saes/, l0_vs_loss_recovered.png)")
    return 0
