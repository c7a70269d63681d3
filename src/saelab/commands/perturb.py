"""`saelab perturb SAE`: KL / CE of an SAE's reconstruction against random perturbations of the
activation with the same cosine similarity (and the SAE's norm), over a range of cosines: does
the SAE's error hurt the model more than a random error of the same size would?

Text, context length, BOS and outlier rules default to those the SAE was trained with (its
recorded provenance); positions the outlier rule flags keep their clean activation in every
variant. Writes the output folder (--out; default: beside the SAE, <SAE>-perturb): perturb.json,
table.md and kl_vs_cos.png; prints the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.experiments.perturb import NORMS, PerturbConfig, format_table, run_perturb
from saelab.sae import SAE


def register(subparsers) -> None:
    d = PerturbConfig()
    p = subparsers.add_parser("perturb", help="SAE splice vs random perturbations at the same cosine (KL vs cos plot)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, metavar="SAE", help="SAE folder (saelab or SAELens layout) with cfg.hook_name")
    p.add_argument("--cos", type=float, nargs="+", default=d.cos_targets,
                   help=f"cosine targets for the random curve (default: {options.shown(d.cos_targets)})")
    p.add_argument("--norm", choices=NORMS, default=d.norm,
                   help="norm of the random perturbations: the SAE output's (sae) or the activation's "
                        f"(input) (default: {d.norm})")
    options.add_seed(p, d.seed)
    options.add_out(p, "{sae}-perturb")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, from_sae=True)
    options.add_eval_contexts(g, options.EVAL_CONTEXTS)
    options.add_context_length(g, None, from_sae=True)
    options.add_lm_batch_size(g, d.batch_size)
    options.add_include_bos(g, from_sae=True)
    options.add_outlier_multiple(g, DEFAULT_MULTIPLE, "keep their clean activation in every variant", from_sae=True)
    options.defaults_apart(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sae = SAE.load(args.sae)
    args = options.for_sae(args, sae)
    lm, tokens = options.lm_and_eval_contexts(args, sae)
    cfg = PerturbConfig(cos_targets=list(args.cos), norm=args.norm, batch_size=args.lm_batch_size,
                        exclude_bos=not args.include_bos, seed=args.seed,
                        outliers=OutlierRule(args.outlier_multiple))
    out = options.output_folder(args)
    result = run_perturb(lm, sae.to(lm.device), tokens, out, cfg, sae_path=str(args.sae))
    print(format_table(result), end="")
    print(f"wrote {out}/perturb.json, table.md, kl_vs_cos.png")
    return 0
