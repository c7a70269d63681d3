"""`saelab perturb [SAE ...] [--hooks HOOK ...]`: KL / CE of random perturbations of an activation
that keep its norm, at a range of cosine similarities to it, against each SAE's reconstruction
at the same cosine: does the SAE's error hurt the model more than a random error of the same
size would, and how robust is each hook to a random error at all (seed 002)?

One SAE and no --hooks: the curve at its hook with the SAE's norm (--norm). Writes --out
(default: beside the SAE, <SAE>-perturb, or in the run folder for an SAE of a run's saes/): perturb.json, table.md and kl_vs_cos.png; prints the
table.

--hooks (and/or several SAEs): a curve at every hook given and every hook an SAE replaces, each
SAE's point on its hook's curve; `--hooks layers` is every layer's hook_attn_out, hook_mlp_out
and hook_resid_post (`layers:0,1` those layers only). A hook with no SAE keeps the activation's
norm. Writes --out (default: runs/perturb): perturb.json, table.md (a line per hook and SAE,
then every variant) and kl_vs_cos.png (a panel per hook); prints the summary. SAEs must come
from one model.

Text, context length, BOS and outlier rules default to those the (first) SAE was trained with
(its recorded provenance); positions the outlier rule flags keep their clean activation in every
variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.errors import ConfigError
from saelab.experiments.perturb import (NORMS, PerturbConfig, format_hook_table, format_table, run_hook_perturb,
                                        run_perturb)
from saelab.lm.hook_names import LAYER_SET
from saelab.lm.resolve import check_one_model
from saelab.sae import SAE
from saelab.sae.format import folder_labels, sae_folders

MANY_OUT = "runs/perturb"


def register(subparsers) -> None:
    d = PerturbConfig()
    p = subparsers.add_parser("perturb", help="KL vs cosine of random perturbations at hooks, with SAEs' points",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, nargs="*", metavar="RUN_OR_SAE",
                   help="SAE folders (saelab or SAELens layout, with cfg.hook_name) or run folders (their saes/)")
    p.add_argument("--hooks", nargs="+", default=[], metavar="HOOK",
                   help=f"hooks to draw the curve at: TransformerLens names, or {LAYER_SET} (every layer's "
                        f"hook_attn_out, hook_mlp_out, hook_resid_post) or {LAYER_SET}:0,1 (those layers) "
                        "(default: only the SAEs' hooks)")
    p.add_argument("--cos", type=float, nargs="+", default=d.cos_targets,
                   help=f"cosine targets for the random curve (default: {options.shown(d.cos_targets)})")
    p.add_argument("--norm", choices=NORMS, default=d.norm,
                   help="norm of the random perturbations where an SAE replaces the hook: the SAE output's (sae) "
                        f"or the activation's (input); elsewhere always the activation's (default: {d.norm})")
    options.add_seed(p, d.seed)
    options.add_out(p, "<SAE>-perturb beside one SAE given without --hooks (in the run folder for an SAE of a "
                       f"run's saes/), else {MANY_OUT}")
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
    folders = folder_labels([f for path in args.sae for f in sae_folders(path)])
    saes = {label: SAE.load(folder) for label, folder in folders.items()}
    check_one_model(saes)
    first = next(iter(saes.values()), None)
    args = options.for_sae(args, first)  # typed, else the (first) SAE's recorded, else the defaults
    if not saes and not args.hooks:
        raise ConfigError("nothing to perturb: give SAE folders, --hooks, or both")
    one = len(saes) == 1 and not args.hooks  # one SAE's curve, else one per hook
    out = args.out or options.check_out(options.beside_sae(*folders.values(), "perturb") if one else Path(MANY_OUT),
                                        "the default output folder")
    cfg = PerturbConfig(cos_targets=list(args.cos), norm=args.norm, batch_size=args.lm_batch_size,
                        exclude_bos=not args.include_bos, seed=args.seed,
                        outliers=OutlierRule(args.outlier_multiple))
    lm, tokens = options.lm_and_eval_contexts(args, first)
    saes = {label: sae.to(lm.device) for label, sae in saes.items()}
    if one:
        [(sae, folder)] = zip(saes.values(), folders.values())
        result = run_perturb(lm, sae, tokens, out, cfg, sae_path=str(folder))
        print(format_table(result), end="")
    else:
        result = run_hook_perturb(lm, tokens, out, args.hooks, saes, cfg, {k: str(f) for k, f in folders.items()})
        print(format_hook_table(result), end="")
    print(f"wrote {out}/perturb.json, table.md, kl_vs_cos.png")
    return 0
