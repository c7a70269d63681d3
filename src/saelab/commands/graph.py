"""`saelab graph PROMPT --transcoders DIR`: the prompt's attribution graph. Every layer's MLP is
replaced by its transcoder (from `saelab sparse-mlp`) plus an error node; with attention patterns
and norm scales frozen, edges are the exact direct effects between token embeddings, transcoder
features, error nodes and one output logit (default: the top prediction after the prompt). The
graph is pruned to the nodes carrying --node-threshold of the influence on that logit; the
printed summary says how much the kept nodes carry and warns when it is little.

Writes the output folder (--out): graph.json (every kept node and edge) and graph.html (layers
bottom to top, positions left to right; features link to their pages in --dashboards)."""

from __future__ import annotations

import argparse

from saelab.commands import options
from saelab.experiments.graph import GraphConfig, format_graph, load_transcoders, run_graph


def register(sub) -> None:
    d = GraphConfig(prompt="x")
    p = sub.add_parser("graph", help="attribution graph of a prompt through transcoders at every layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", metavar="PROMPT", help="the text (BOS is put before it)")
    p.add_argument("--transcoders", nargs="+", required=True, metavar="DIR",
                   help="a `saelab sparse-mlp` run folder, or one transcoder folder per layer")
    p.add_argument("--logit", default=None, metavar="TOKEN",
                   help="the next token whose logit is explained, as text (' def') or as the tokenizer spells it "
                        "(default: the model's top prediction)")
    p.add_argument("--node-threshold", type=float, default=d.node_threshold,
                   help=f"keep nodes until they carry this share of the influence on the logit (default: {d.node_threshold})")
    p.add_argument("--edge-threshold", type=float, default=d.edge_threshold,
                   help=f"keep edges between kept nodes until this share of the edge score (default: {d.edge_threshold})")
    p.add_argument("--max-nodes", type=options.positive_int, default=d.max_nodes,
                   help=f"keep at most this many nodes besides the logit (default: {d.max_nodes})")
    p.add_argument("--dashboards", nargs="+", default=[], metavar="DIR",
                   help="`saelab dashboard` folders of the transcoders: feature nodes link to their pages")
    options.add_out(p, "runs/graph")
    options.add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saelab.lm.resolve import load_lm

    cfg = GraphConfig(prompt=args.prompt, logit=args.logit, node_threshold=args.node_threshold,
                      edge_threshold=args.edge_threshold, max_nodes=args.max_nodes)
    transcoders = load_transcoders(args.transcoders)
    lm = load_lm(args.model, next(iter(transcoders.values()))[1], device=args.device, dtype=args.dtype)
    out = options.output_folder(args)
    print(format_graph(run_graph(lm, transcoders, cfg, out, args.dashboards)))
    print(f"\nwrote {out}/graph.json and graph.html")
    return 0
