"""`saelab steer SAE --feature I --scale S [S ...] --prompt TEXT`: add S * W_dec[I] (the
feature's decoder row as stored, NOT unit-normalised, as in SAELens-style steering: S is in
units of the feature's activation; its norm is printed) at the SAE's hook (a transcoder's
output hook) at every position while the model continues the prompt, greedily or with
--temperature and --seed. Prints the unsteered and steered continuations side by side per
scale, and at the prompt's last position the next tokens whose probability rises and falls
most (p before, p after).

Writes the output folder (--out; default: beside the SAE, <SAE>-steer, or in the run folder for an
SAE of a run's saes/): steer.json and steer.png (probability of the most promoted next tokens
against the scale)."""

from __future__ import annotations

import argparse

from saelab.commands import options
from saelab.experiments.steer import SteerConfig, format_steer, run_steer


def register(sub) -> None:
    d = SteerConfig(feature=0, scales=[1.0], prompt="x")
    p = sub.add_parser("steer", help="generate with an SAE feature's decoder direction added at its hook",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", metavar="SAE", help="SAE folder (saelab or SAELens layout) with cfg.hook_name")
    p.add_argument("--feature", type=int, required=True, help="the feature's index")
    p.add_argument("--scale", type=float, nargs="+", required=True,
                   help="one or more multiples of W_dec[feature] to add (negative values subtract it)")
    p.add_argument("--prompt", required=True, help="the text the model continues (BOS is put before it)")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=d.max_new_tokens,
                   help=f"tokens generated per text (default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature; 0 is greedy (default: {d.temperature:g})")
    p.add_argument("--top", type=options.positive_int, default=d.top,
                   help=f"next tokens listed per direction of change (default: {d.top})")
    options.add_seed(p, d.seed)
    options.add_out(p, None, beside="steer")
    options.add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = SteerConfig(feature=args.feature, scales=list(args.scale), prompt=args.prompt,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, top=args.top)
    out = options.output_folder(args)
    sae, lm = options.sae_and_lm(args)
    print(format_steer(run_steer(lm, sae, cfg, out)))
    print(f"\nwrote {out}/steer.json and steer.png")
    return 0
