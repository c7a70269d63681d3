"""`saelab prune SAE --target-l0 40`: kill the most frequent features until L0 < target, then
recompute MSE, FVU, L0 and % loss recovered for the original and each pruned dictionary (seed
000). With `--compare RUN`, the SAEs of a training sweep (other L1 / k) are plotted beside the
pruning curve: L0 against loss recovered, pruned versus trained-sparser.

Writes the output folder (--out; default: beside the SAE, <SAE>-pruned, or in the run folder for
an SAE of a run's saes/): metrics.json (one entry per dictionary), l0_vs_loss_recovered.png and, with --save, each pruned SAE folder; prints the
table. Text, context length, BOS and outlier rules default to those the SAE was trained with."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.experiments.prune import PruneConfig, format_prune, run_prune
from saelab.sae import SAE


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune high-frequency features to a target L0 and re-measure", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", help="SAE folder")
    p.add_argument("--target-l0", type=float, nargs="+", required=True, help="one or more target L0 values")
    p.add_argument("--compare", help="a run folder whose saes/ and metrics.json to plot beside the pruning curve")
    options.add_out(p, None, beside="pruned")
    p.add_argument("--save", action="store_true", help="also save each pruned SAE folder")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, from_sae=True)
    options.add_eval_contexts(g, options.EVAL_CONTEXTS)
    options.add_context_length(g, None, from_sae=True)
    options.add_include_bos(g, from_sae=True)
    options.add_outlier_multiple(g, DEFAULT_MULTIPLE, "left out of the densities and metrics (reported beside "
                                 "them) and kept clean in the splice", from_sae=True)
    options.defaults_apart(p)
    p.set_defaults(func=run)


def run(args) -> int:
    sae = SAE.load(args.sae).eval()
    args = options.for_sae(args, sae)
    out = options.output_folder(args)
    cfg = PruneConfig(target_l0=list(args.target_l0), label=Path(args.sae).name, save=args.save,
                      compare=Path(args.compare) if args.compare else None, exclude_bos=not args.include_bos,
                      outliers=OutlierRule(args.outlier_multiple), source=args.source)
    lm, tokens = options.lm_and_eval_contexts(args, sae)
    sae.to(lm.device)
    print(format_prune(run_prune(lm, sae, tokens, out, cfg)))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'l0_vs_loss_recovered.png'}")
    return 0
