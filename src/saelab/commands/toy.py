"""`saelab toy`: train a small sweep on synthetic data with known features and report recovery."""

from __future__ import annotations

import time

from saelab.data.toy import ToyDataConfig
from saelab.pipelines.toy import ToySweepConfig, format_table, run_toy_sweep


def register(sub) -> None:
    p = sub.add_parser("toy", help="ground-truth recovery (MMCS) of an L1 / k sweep on toy data", description=__doc__)
    p.add_argument("--out", default="runs/toy", help="run folder (resumes if it holds a checkpoint)")
    p.add_argument("--d", type=int, default=64, help="activation dimension")
    p.add_argument("--n-features", type=int, default=256, help="ground-truth features (> d: superposition)")
    p.add_argument("--mean-active", type=float, default=5.0, help="expected true features active per sample")
    p.add_argument("--uncorrelated", action="store_true", help="features fire independently")
    p.add_argument("--width", type=int, default=256, help="SAE width")
    p.add_argument("--l1", type=float, nargs="*", default=[0.15, 0.3, 0.6], help="relu L1 coefficients")
    p.add_argument("--k", type=int, nargs="*", default=[5], help="topk k values")
    p.add_argument("--arch-k", default="topk", choices=["topk", "batchtopk"], help="architecture for the k values")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    data = ToyDataConfig(
        d=args.d,
        n_features=args.n_features,
        mean_active=args.mean_active,
        correlated=not args.uncorrelated,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    cfg = ToySweepConfig(
        data=data, width=args.width, l1=args.l1, k=args.k, arch_k=args.arch_k, steps=args.steps, lr=args.lr, seed=args.seed
    )
    start = time.perf_counter()
    entries = run_toy_sweep(cfg, args.out)
    print(format_table(entries))
    print(f"\n{len(entries)} SAEs trained together in {time.perf_counter() - start:.0f} s; run folder: {args.out}")
    return 0
