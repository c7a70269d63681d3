"""`saelab frontier [SAE] --target-l0 30 60 120`: seed 000's question, answered at each target
L0: prune the densest features of an SAE trained with a too-low penalty (SAE, or one trained
here at --base-coefficient), or train an SAE of the same width and architecture with the
penalty that reaches the target (found by bisection in log space over the coefficient; each
round's runs train together in one pass)? Both are evaluated on the same held-out contexts.

Prints a table (L0, MSE, CE increase, KL, % loss recovered per SAE) and, per metric, where the
two curves cross or which family is better over the shared L0 range. With the defaults, on the
offline default LM: under 3 minutes on 2 CPU cores (2 min 46 s, measured with other jobs on
the machine).

Writes the output folder (--out; a rerun resumes every training pass): metrics.json,
frontier.json, table.txt, frontier.png (L0 against loss recovered, MSE and CE increase), and
the runs: base/, search/, trained/ (saes/ in each), pruned/ and the shared activation cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from saelab.commands import options
from saelab.errors import ConfigError
from saelab.experiments.frontier import FrontierConfig, format_frontier, run_frontier
from saelab.lm.resolve import check_sae_fits, load_lm
from saelab.sae import SAE

BASE_ONLY = ("arch", "expansion", "d_sae", "base_coefficient", "hook")  # options of a base trained here


def register(sub) -> None:
    d = FrontierConfig()
    p = sub.add_parser("frontier", help="prune a too-low-penalty SAE or train to each L0? (curves, crossing point)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", nargs="?", type=Path, metavar="SAE",
                   help="the base SAE folder (read, never written); default: train one here at --base-coefficient")
    p.add_argument("--target-l0", type=float, nargs="+", default=d.target_l0,
                   help=f"target L0 values (default: {options.shown(d.target_l0)})")
    g = p.add_argument_group("the base trained here (without SAE; a given SAE fixes these)")
    options.add_arch(g, d.arch, many=False)
    options.add_widths(g, d.expansion, d.d_sae, many=False)
    g.add_argument("--base-coefficient", type=float, default=d.base_coefficient,
                   help=f"the base's too-low sparsity coefficient (default: {d.base_coefficient:g})")
    options.add_hook(g)
    g = p.add_argument_group("the search and the training of both")
    g.add_argument("--coefficient-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="the bisection's bounds (default: the base's coefficient and 64 times it)")
    g.add_argument("--search-steps", type=options.positive_int, default=None,
                   help="steps of the bisection's runs (default: --steps, whose runs then serve as full runs; "
                        "fewer are faster, but an SAE's L0 still falls late in training, so the full run's L0 misses)")
    g.add_argument("--search-rounds", type=int, default=d.search_rounds,
                   help=f"bisection rounds after the bound runs (default: {d.search_rounds})")
    g.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"a target is reached within this relative L0 error (default: {d.tolerance:g})")
    options.add_steps(g, d.steps)
    options.add_batch_tokens(g, d.batch_tokens)
    options.add_train_contexts(g, d.train_contexts)
    options.add_seed(g, d.seed)
    options.add_out(p, "<SAE>-frontier beside the SAE (in the run folder for an SAE of a run's saes/), "
                       "or runs/frontier without SAE")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, d.source)
    options.add_eval_contexts(g, d.eval_contexts)
    options.add_context_length(g, d.context_length)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> FrontierConfig:
    """The FrontierConfig of the options; options of a base trained here refused beside an SAE."""
    d = FrontierConfig()
    typed = [name for name in BASE_ONLY if getattr(args, name) != getattr(d, name)]
    if args.sae is not None and typed:
        names = ", ".join("--" + n.replace("_", "-") for n in typed)
        raise ConfigError(f"{names}: these set the base trained here, and the SAE given fixes its architecture, "
                          "width and hook")
    base = {name: getattr(args, name) for name in BASE_ONLY}
    return FrontierConfig(target_l0=list(args.target_l0), coefficient_range=args.coefficient_range,
                          search_steps=args.search_steps, search_rounds=args.search_rounds, tolerance=args.tolerance,
                          steps=args.steps, batch_tokens=args.batch_tokens, train_contexts=args.train_contexts,
                          seed=args.seed, source=args.source, eval_contexts=args.eval_contexts,
                          context_length=args.context_length, device=args.device, lm_dtype=args.dtype, **base)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = config_from_args(args)
    sae = SAE.load(args.sae).eval() if args.sae is not None else None
    out = args.out or options.check_out(options.beside_sae(args.sae, "frontier") if args.sae is not None
                                        else Path("runs/frontier"), "the default output folder")
    lm = load_lm(args.model, sae, device=args.device, dtype=args.dtype)
    if sae is not None:
        check_sae_fits(lm, sae)
    result = run_frontier(lm, out, cfg, sae=sae, sae_path=args.sae)
    print(format_frontier(result))
    print(f"\nwrote {out}/metrics.json, frontier.json, table.txt, frontier.png in {time.perf_counter() - start:.0f} s")
    return 0
