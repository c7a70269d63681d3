"""`saelab perturb`: KL / CE of an SAE's reconstruction against random perturbations of the
activation with the same cosine similarity (and the SAE's norm), over a range of cosines."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands._lm_eval_args import add_lm_data_args, model_and_eval_tokens, output_folder
from saelab.experiments.perturb import PerturbConfig, format_table, run_perturb
from saelab.sae import SAE


def register(subparsers) -> None:
    p = subparsers.add_parser("perturb", help="SAE splice vs random perturbations at the same cosine (KL vs cos plot)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, metavar="SAE", help="SAE folder (saelab or SAELens layout) with cfg.hook_name")
    p.add_argument("--cos", type=float, nargs="+", default=PerturbConfig().cos_targets,
                   help="cosine targets for the random curve (default: %(default)s)")
    p.add_argument("--norm", choices=("sae", "input"), default="sae",
                   help="norm of the random perturbations: the SAE output's (default) or the activation's")
    add_lm_data_args(p, out="{sae}-perturb")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sae = SAE.load(args.sae)
    lm, tokens = model_and_eval_tokens(args, sae)
    cfg = PerturbConfig(cos_targets=list(args.cos), norm=args.norm, batch_size=args.batch_size,
                        exclude_bos=not args.include_bos, seed=args.seed)
    out = output_folder(args)
    result = run_perturb(lm, sae, tokens, out, cfg, sae_path=str(args.sae))
    print(format_table(result), end="")
    print(f"wrote {out}/perturb.json, table.md, kl_vs_cos.png")
    return 0
