"""`saelab quickstart`: the whole pipeline on the offline default, in about ten minutes on a
laptop CPU — build the default LM if needed, cache activations at the middle layer's residual
stream, train relu SAEs at several L1 and topk SAEs at several k, at 4x and 8x width, in one
pass; evaluate each (MSE, FVU, L0, dead, dense, % CE loss recovered, KL); print the table.

Writes the run folder (--out; resumes if interrupted) like `saelab train`: saes/<label>/,
metrics.json, log.jsonl, table.txt, l0_vs_loss_recovered.png and feature_density.png. Every
option of `saelab train` works here too, with smaller defaults."""

from __future__ import annotations

import argparse
import time

from saelab.commands.sweep_options import PRECEDENCE, add_sweep_options, run_sweep
from saelab.train.sweep import SweepGrid

GRID = SweepGrid(arch=["relu", "topk"], expansion=[4, 8], coefficient=[2.0, 5.0], k=[16, 32])


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the offline default (about 10 minutes)",
                       description=__doc__, epilog=PRECEDENCE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_options(p, out="runs/quickstart", grid=GRID, steps=400, train_contexts=4096)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    ran = run_sweep(args)
    if ran is None:
        return 0
    entries, out = ran
    best = max(entries, key=lambda e: e.get("loss_recovered", float("-inf")))
    print(f"\nbest loss recovered: {best['name']} {100 * best['loss_recovered']:.1f}% at L0 {best['l0']:.1f}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {out / 'metrics.json'}  plots: {out / 'l0_vs_loss_recovered.png'}, {out / 'feature_density.png'}"
          f"  log: {out / 'log.jsonl'}")
    print(f"next: saelab dashboard {out / 'saes' / best['name']}")
    return 0
