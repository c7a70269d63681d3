"""`saelab prune SAE --target-l0 40`: kill the most frequent features until L0 < target, then
recompute MSE, FVU, L0 and % loss recovered for the original and each pruned dictionary (seed
000). With `--compare RUN`, the SAEs of a training sweep (other L1 / k) are plotted beside the
pruning curve: L0 against loss recovered, pruned versus trained-sparser."""

from __future__ import annotations

from pathlib import Path

from saelab.experiments.prune import PruneConfig, format_prune, run_prune
from saelab.lm.resolve import heldout_contexts, load_lm
from saelab.sae import SAE


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune high-frequency features to a target L0 and re-measure", description=__doc__)
    p.add_argument("sae", help="SAE folder")
    p.add_argument("--target-l0", type=float, nargs="+", required=True, help="one or more target L0 values")
    p.add_argument("--model", help="HF model folder or hub name (default: the one the SAE records, else the offline default)")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts to measure on")
    p.add_argument("--source", default="stdlib", help="text source for the held-out tokens")
    p.add_argument("--compare", help="a run folder whose saes/ and metrics.json to plot beside the pruning curve")
    p.add_argument("--out", help="output folder (default: <sae>-pruned)")
    p.add_argument("--save", action="store_true", help="also save each pruned SAE folder")
    p.set_defaults(func=run)


def run(args) -> int:
    sae = SAE.load(args.sae).eval()
    lm = load_lm(args.model, sae)
    tokens = heldout_contexts(lm, args.source, n_contexts=args.contexts)
    out = Path(args.out or f"{args.sae.rstrip('/')}-pruned")
    cfg = PruneConfig(target_l0=list(args.target_l0), label=Path(args.sae).name, save=args.save,
                      compare=Path(args.compare) if args.compare else None)
    print(format_prune(run_prune(lm, sae, tokens, out, cfg)))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'l0_vs_loss_recovered.png'}")
    return 0
