"""`saelab train`: a sweep of SAEs (or transcoders, with --hook-out) on one hook of a language
model, trained together in one pass over the data: every architecture given at every width, at
each of its k or sparsity-coefficient values, with any training setting of TrainSpec; or
exactly the SAEs a --config file lists. Each SAE is then evaluated on held-out text (MSE, FVU,
L0, dead, dense, % CE loss recovered, KL).

Writes the run folder (--out; an interrupted run resumes from its checkpoint): saes/<label>/
(each SAE, SAELens-compatible), metrics.json, config.json (every setting), log.jsonl, table.txt,
l0_vs_loss_recovered.png, feature_density.png and the activation cache (cache/); with
--reference, recovery_curve.json and .png (seed 001: with --init tied data, which init finds
the reference's features sooner)."""

from __future__ import annotations

import argparse
import json

from saelab.commands.sweep_options import PRECEDENCE, add_sweep_options, run_sweep
from saelab.pipelines.recovery_curve import CURVE_FILE, format_curve_summary
from saelab.train.sweep import SweepGrid


def register(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate a sweep of SAEs on a language model hook",
                       description=__doc__, epilog=PRECEDENCE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_options(p, out="runs/train", grid=SweepGrid(), steps=1000, train_contexts=8192)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ran = run_sweep(args)
    if ran is None:
        return 0
    out = ran[1]
    if (out / CURVE_FILE).exists():
        print(f"\n{format_curve_summary(json.loads((out / CURVE_FILE).read_text()))}")
    print(f"\nrun folder: {out} (metrics.json, log.jsonl, saes/, l0_vs_loss_recovered.png)")
    return 0
