"""`saelab toy`: train a small sweep on synthetic data with known features and report recovery:
every --arch (relu, topk, gated, ... all six) at each of its --coefficient or --k values, on
activations made of known sparse features in superposition; each SAE's MMCS against the true
features and the share it recovers.

Writes the run folder (--out; resumes if it holds a checkpoint): saes/<label>/, metrics.json,
config.json (every setting, the data's included) and log.jsonl; prints the table."""

from __future__ import annotations

import argparse
import time

from saelab.commands import options
from saelab.data.toy import ToyDataConfig
from saelab.pipelines.toy import ToySweepConfig, format_table, run_toy_sweep


def register(sub) -> None:
    d = ToySweepConfig()
    p = sub.add_parser("toy", help="ground-truth recovery (MMCS) of an L1 / k sweep on toy data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_out(p, "runs/toy")
    g = p.add_argument_group("toy data")
    g.add_argument("--d", type=options.positive_int, default=d.data.d, help=f"activation dimension (default: {d.data.d})")
    g.add_argument("--n-features", type=options.positive_int, default=d.data.n_features,
                   help=f"ground-truth features (> d: superposition) (default: {d.data.n_features})")
    g.add_argument("--mean-active", type=float, default=float(d.data.mean_active),
                   help=f"expected true features active per sample (default: {d.data.mean_active})")
    g.add_argument("--uncorrelated", action="store_true", help="features fire independently")
    g = p.add_argument_group("the sweep")
    g.add_argument("--width", type=options.positive_int, default=d.width, help=f"SAE width d_sae (default: {d.width})")
    options.add_arch(g, d.arch)
    options.add_coefficients(g, d.coefficient)
    options.add_ks(g, d.k)
    options.add_steps(g, d.steps)
    options.add_batch_tokens(g, d.data.batch_size)
    options.add_spec_options(g, ["lr"], defaults={"lr": d.lr})
    options.add_seed(g, d.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = ToyDataConfig(
        d=args.d,
        n_features=args.n_features,
        mean_active=args.mean_active,
        correlated=not args.uncorrelated,
        batch_size=args.batch_tokens,
        seed=args.seed,
    )
    cfg = ToySweepConfig(data=data, width=args.width, arch=args.arch, coefficient=args.coefficient, k=args.k,
                         steps=args.steps, lr=args.lr, seed=args.seed)
    out = options.output_folder(args)
    start = time.perf_counter()
    entries = run_toy_sweep(cfg, out)
    print(format_table(entries))
    print(f"\n{len(entries)} SAEs trained together in {time.perf_counter() - start:.0f} s; run folder: {out}")
    return 0
