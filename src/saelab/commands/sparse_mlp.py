"""`saelab sparse-mlp`: train a wide sparse MLP (transcoder MLP input -> MLP output) for each
layer, then report loss recovered against zero-ablating the MLP and how closely the sparse
neurons match the original neurons' input and output weights."""

from __future__ import annotations

import argparse

from saelab.commands._lm_eval_args import add_lm_data_args, model_and_eval_tokens, output_folder
from saelab.data.corpus import token_contexts
from saelab.experiments.sparse_mlp import SparseMLPConfig, format_report, run_sparse_mlp

_DEFAULT = SparseMLPConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser("sparse-mlp", help="sparse MLPs per layer: loss recovered and neuron matches",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: all)")
    p.add_argument("--arch", default=_DEFAULT.arch, choices=("relu", "topk", "batchtopk", "jumprelu"))
    p.add_argument("--k", type=int, nargs="+", default=_DEFAULT.k, help="active neurons per token, topk/batchtopk (a sweep if several)")
    p.add_argument("--l1", type=float, nargs="+", default=_DEFAULT.l1, help="sparsity coefficients, relu/jumprelu (a sweep if several)")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--d-sae", type=int, default=None, help="sparse neurons per layer")
    width.add_argument("--expansion", type=float, default=_DEFAULT.expansion, help="sparse neurons = expansion x d_model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=_DEFAULT.steps)
    p.add_argument("--batch-tokens", type=int, default=_DEFAULT.batch_tokens)
    p.add_argument("--lr", type=float, default=_DEFAULT.lr)
    p.add_argument("--train-contexts", type=int, default=2048, help="contexts whose activations are trained on (held in memory)")
    add_lm_data_args(p, out="runs/sparse-mlp")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm, held = model_and_eval_tokens(args)
    train = token_contexts(args.source, lm.tokenizer, held.shape[1], split="train", max_contexts=args.train_contexts)
    cfg = SparseMLPConfig(layers=args.layers, arch=args.arch, d_sae=args.d_sae, expansion=args.expansion,
                          k=list(args.k), l1=list(args.l1), lr=args.lr, steps=args.steps,
                          batch_tokens=args.batch_tokens, exclude_bos=not args.include_bos,
                          lm_batch_size=args.batch_size, seed=args.seed)
    out = output_folder(args)
    entries = run_sparse_mlp(lm, train, held, out, cfg)
    print(format_report(entries, lm.name), end="")
    print(f"wrote {out}/metrics.json, report.md, neuron_cosines.json/.png and layer*/saes/")
    return 0
