"""`saelab quickstart`: the whole pipeline on the offline default, in about ten minutes on a
laptop CPU — build the default LM if needed, cache activations at the middle layer's residual
stream, train relu SAEs at several L1 and topk SAEs at several k, at 4x and 8x width, in one
pass; evaluate each (MSE, FVU, L0, dead, dense, % CE loss recovered, KL); print the table and
write the run folder with metrics.json, the training log and the L0 / loss-recovered plot."""

from __future__ import annotations

import time
from pathlib import Path

from saelab.commands.train import add_sweep_args, config_from_args
from saelab.pipelines.train_lm import TABLE_COLUMNS, run_lm_sweep
from saelab.tables import format_rows


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the offline default (about 10 minutes)", description=__doc__)
    p.add_argument("--out", default="runs/quickstart", help="run folder (resumes if interrupted)")
    add_sweep_args(p, steps=400, contexts=4096, l1=[2.0, 5.0], ks=[16, 32], expansions=[4, 8])
    p.set_defaults(func=run)


def run(args) -> int:
    start = time.perf_counter()
    entries = run_lm_sweep(config_from_args(args), args.out)
    out = Path(args.out)
    print(format_rows(entries, TABLE_COLUMNS))
    best = max(entries, key=lambda e: e.get("loss_recovered", float("-inf")))
    print(f"\nbest loss recovered: {best['name']} {100 * best['loss_recovered']:.1f}% at L0 {best['l0']:.1f}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {out / 'metrics.json'}  plots: {out / 'l0_vs_loss_recovered.png'}, {out / 'feature_density.png'}"
          f"  log: {out / 'log.jsonl'}")
    print(f"next: saelab dashboard {out / 'saes' / best['name']}")
    return 0
