"""`saelab sparse-mlp`: train a wide sparse MLP (transcoder MLP input -> MLP output) for each
layer, then report loss recovered against zero-ablating the MLP and how closely the sparse
neurons match the original neurons' input and output weights.

Writes the output folder (--out): metrics.json (one entry per layer and SAE), report.md,
neuron_cosines.json and .png, and layer<L>/ (each layer's training run, with saes/<label>/);
prints the report."""

from __future__ import annotations

import argparse

from saelab.commands import options
from saelab.data.corpus import token_contexts
from saelab.errors import ConfigError
from saelab.experiments.sparse_mlp import SparseMLPConfig, format_report, run_sparse_mlp
from saelab.train.sweep import check_applies

TRAIN_CONTEXTS = 2048  # held in memory: every position's activations at both hooks


def register(subparsers) -> None:
    d = SparseMLPConfig()
    p = subparsers.add_parser("sparse-mlp", help="sparse MLPs per layer: loss recovered and neuron matches",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=d.layers, help="layers (default: all)")
    options.add_out(p, "runs/sparse-mlp")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g)
    options.add_train_contexts(g, TRAIN_CONTEXTS)
    options.add_eval_contexts(g, options.EVAL_CONTEXTS)
    options.add_context_length(g, None)
    options.add_lm_batch_size(g, d.lm_batch_size)
    options.add_include_bos(g)
    options.add_outlier_multiple(g, d.outlier_multiple, "rows whose MLP input is one are dropped from training, "
                                 "left out of the metrics (reported beside them) and kept clean in the splice")
    g = p.add_argument_group("the sparse MLPs (a sweep over --k or --coefficient, per layer)")
    options.add_arch(g, d.arch, many=False)
    options.add_widths(g, d.expansion, d.d_sae, many=False)
    options.add_coefficients(g, d.l1)
    options.add_ks(g, d.k)
    options.add_steps(g, d.steps)
    options.add_batch_tokens(g, d.batch_tokens)
    options.add_spec_options(g, ["lr"], defaults={"lr": d.lr})
    options.add_seed(g, d.seed)
    options.defaults_apart(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    typed, args = options.given(args), options.filled(args)
    check_applies([name for name in ("coefficient", "k") if name in typed], [args.arch])
    if "d_sae" in typed and "expansion" in typed:
        raise ConfigError("give the width as --d-sae or as --expansion, not both")
    lm, held = options.lm_and_eval_contexts(args)
    train = token_contexts(args.source, lm.tokenizer, held.shape[1], split="train", max_contexts=args.train_contexts)
    cfg = SparseMLPConfig(layers=args.layers, arch=args.arch, d_sae=args.d_sae, expansion=args.expansion,
                          k=list(args.k), l1=list(args.coefficient), lr=args.lr, steps=args.steps,
                          batch_tokens=args.batch_tokens, exclude_bos=not args.include_bos,
                          lm_batch_size=args.lm_batch_size, seed=args.seed, outlier_multiple=args.outlier_multiple,
                          source=args.source)
    out = options.output_folder(args)
    entries = run_sparse_mlp(lm, train, held, out, cfg)
    print(format_report(entries, lm.name), end="")
    print(f"wrote {out}/metrics.json, report.md, neuron_cosines.json/.png and layer*/saes/")
    return 0
