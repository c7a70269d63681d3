"""`saelab count`: estimate how many features a layer holds (seed 001): SAEs of growing width
(--widths, multiples of d_in) trained together at one sparsity (--arch with --coefficient or
--k), each width's distinct features matched in the next above --threshold, and the number
where that matched count levels off (a saturation fit; count.txt says which and why).

On a language model (--model, --hook, --source; default: the offline default LM's middle
residual stream) it counts the layer's features; `--toy N` runs the same method on toy data
with N known features and prints the estimate beside N, so you can see how far to trust it.
With several --coefficient (or --k) values, count.png also has the recovery plot (MMCS against
the knob per width); --beside-toy N puts an LM run's beside the same sweep on toy data.

Writes the run folder (--out; resumes if it holds a checkpoint): the sweep's files (saes/,
metrics.json, config.json, ...), count.json, count.txt and count.png; prints the table."""

from __future__ import annotations

import argparse
import dataclasses
import time

from saelab.commands import options
from saelab.data.toy import ToyDataConfig
from saelab.experiments.count import LM_KNOBS, TOY_KNOBS, CountConfig, run_count_lm, run_count_toy
from saelab.experiments.count_report import plot_beside, write_report
from saelab.pipelines.train_lm import LMSweepConfig
from saelab.train.sweep import check_applies

TOY_BATCH = 1024  # toy rows per step (as `saelab toy`)
LM = LMSweepConfig(specs=[], train_contexts=2048, batch_size=2048)  # an LM run's defaults


def register(sub) -> None:
    d = CountConfig()
    p = sub.add_parser("count", help="estimate how many features a layer holds (width sweep; seed 001)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_out(p, "runs/count")
    g = p.add_argument_group("the width sweep")
    g.add_argument("--widths", type=float, nargs="+", default=d.widths,
                   help=f"dictionary widths as multiples of d_in, growing (default: {options.shown(d.widths)})")
    options.add_arch(g, d.arch, many=False)
    options.add_coefficients(g, None, _shown(TOY_KNOBS["coefficient"], LM_KNOBS["coefficient"]))
    options.add_ks(g, None, _shown(TOY_KNOBS["k"], LM_KNOBS["k"]))
    g.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"cosine above which a feature counts as found in the next width (default: {d.threshold})")
    options.add_steps(g, d.steps)
    options.add_batch_tokens(g, None, f"{TOY_BATCH} on toy data, {LM.batch_size} on a model")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-3 on toy data, 1e-3 on a model)")
    options.add_seed(g, d.seed)
    g = p.add_argument_group("toy data (--toy N: count where the answer is known)")
    g.add_argument("--toy", type=options.positive_int, metavar="N", help="run on toy data with N true features")
    g.add_argument("--beside-toy", type=options.positive_int, metavar="N",
                   help="on a model: also run the sweep on toy data of the hook's width with N true features (its "
                        "L1 coefficients scaled by 0.3 / 3, the two defaults; k as given) into OUT/toy, and plot "
                        "both recovery panels side by side (beside_toy.png)")
    options.add_toy_data(g, ToyDataConfig(d=64, mean_active=5), n_features=False)
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_hook(g)
    options.add_source(g, LM.source)
    options.add_train_contexts(g, LM.train_contexts)
    options.add_eval_contexts(g, LM.eval_contexts)
    options.add_context_length(g, LM.context_length)
    p.set_defaults(func=run)


def toy_sweep(cfg: CountConfig) -> CountConfig:
    """The sweep of --beside-toy: the model's, its coefficients scaled by the two data kinds'
    defaults (toy activations are not normalised: L1 1.5 3 6 on a model is 0.15 0.3 0.6 on toy)."""
    if cfg.coefficient is None:
        return cfg
    scale = TOY_KNOBS["coefficient"][0] / LM_KNOBS["coefficient"][0]
    return dataclasses.replace(cfg, coefficient=[c * scale for c in cfg.coefficient])


def _shown(toy: list, lm: list) -> str:
    return f"{options.shown(toy)} on toy data, {options.shown(lm)} on a model"


def run(args: argparse.Namespace) -> int:
    check_applies([name for name in ("coefficient", "k") if getattr(args, name) is not None], [args.arch])
    cfg = CountConfig(widths=args.widths, arch=args.arch, coefficient=args.coefficient, k=args.k,
                      threshold=args.threshold, steps=args.steps, lr=args.lr, seed=args.seed)
    out, start = options.output_folder(args), time.perf_counter()
    if args.toy:
        args.batch_tokens = args.batch_tokens or TOY_BATCH
        result = run_count_toy(cfg, options.toy_data(args, args.toy), out)
    else:
        sweep = LMSweepConfig(specs=[], model=args.model, hook=args.hook, source=args.source,
                              context_length=args.context_length, train_contexts=args.train_contexts,
                              eval_contexts=args.eval_contexts, batch_size=args.batch_tokens or LM.batch_size,
                              device=args.device, lm_dtype=args.dtype)
        result = run_count_lm(cfg, sweep, out)
    print(write_report(result))
    if args.beside_toy and not args.toy:
        args.d, args.batch_tokens = result.d_in, TOY_BATCH
        toy = run_count_toy(toy_sweep(cfg), options.toy_data(args, args.beside_toy), out / "toy")
        print("\n" + write_report(toy))
        print(f"\nwrote {plot_beside(result, toy, out / 'beside_toy.png')}")
    print(f"\ntook {time.perf_counter() - start:.0f} s; run folder: {out} (count.json, count.txt, count.png)")
    return 0
