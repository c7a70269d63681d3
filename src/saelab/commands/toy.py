"""`saelab toy`: train a small sweep on synthetic data with known features and report recovery:
every --arch (relu, topk, gated, ... all six) at each of its --coefficient or --k values, on
activations made of known sparse features in superposition; each SAE's MMCS against the true
features and the share it recovers.

With --init data tied (seed 001's data-sample initialisation), every SAE is trained once per
init and its MMCS against the ground truth is recorded during training (--curve-every), so the
curves show which init recovers features sooner.

Writes the run folder (--out; resumes if it holds a checkpoint): saes/<label>/, metrics.json,
config.json (every setting, the data's included) and log.jsonl, and with curves
recovery_curve.json and .png; prints the table (and the curves' summary)."""

from __future__ import annotations

import argparse
import json
import time

from saelab.commands import options
from saelab.errors import ConfigError
from saelab.pipelines.recovery_curve import CURVE_FILE, format_curve_summary
from saelab.pipelines.toy import ToySweepConfig, format_table, run_toy_sweep
from saelab.train.spec import INITS

CURVE_EVERY = 25  # steps between recovery measurements when --init asks for curves


def register(sub) -> None:
    d = ToySweepConfig()
    p = sub.add_parser("toy", help="ground-truth recovery (MMCS) of an L1 / k sweep on toy data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_out(p, "runs/toy")
    options.add_toy_data(p.add_argument_group("toy data"), d.data)
    g = p.add_argument_group("the sweep")
    g.add_argument("--width", type=options.positive_int, default=d.width, help=f"SAE width d_sae (default: {d.width})")
    options.add_arch(g, d.arch)
    options.add_coefficients(g, d.coefficient)
    options.add_ks(g, d.k)
    options.add_steps(g, d.steps)
    options.add_batch_tokens(g, d.data.batch_size)
    options.add_spec_options(g, ["lr"], defaults={"lr": d.lr})
    options.add_seed(g, d.seed)
    g = p.add_argument_group("initialisation and recovery during training (seed 001)")
    g.add_argument("--init", nargs="+", choices=INITS, default=None,
                   help="decoder inits, each SAE trained once per init: 'tied' (random rows, W_enc = W_dec^T), "
                        "'data' (rows are samples of the first batch); giving it records recovery during training "
                        "(default: tied, no curve)")
    g.add_argument("--curve-every", type=int, default=None, metavar="N",
                   help=f"MMCS against the ground truth every N steps, from the initial SAEs: recovery_curve.json "
                        f"and .png; 0: off (default: {CURVE_EVERY} when --init is given, else off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    curve_every = args.curve_every if args.curve_every is not None else (CURVE_EVERY if args.init else 0)
    if curve_every < 0:
        raise ConfigError(f"--curve-every must be >= 0, got {curve_every}")
    cfg = ToySweepConfig(data=options.toy_data(args), width=args.width, arch=args.arch, coefficient=args.coefficient,
                         k=args.k, steps=args.steps, lr=args.lr, seed=args.seed, init=args.init or ["tied"],
                         curve_every=curve_every)
    out = options.output_folder(args)
    start = time.perf_counter()
    entries = run_toy_sweep(cfg, out)
    print(format_table(entries))
    if curve_every:
        print(f"\n{format_curve_summary(json.loads((out / CURVE_FILE).read_text()))}")
    print(f"\n{len(entries)} SAEs trained together in {time.perf_counter() - start:.0f} s; run folder: {out}")
    return 0
