"""`saelab tokens SAE --feature I`: a feature read in the model's input-embedding space: the
tokens nearest its encoder and decoder vectors, and with --tree the model's own definition of a
"ghost token" placed at the vector (`A typical definition of <ghost> is "`), expanded as a tree
of likely continuations with cumulative probabilities. The vector is scale * (mean token
embedding norm) * unit(feature vector); the list score is sign(c) |c|^exponent / distance with
c the cosine (see saelab.interpret.embedding).

Trees lose their generic parts by default: continuations that trees grown from random points in
embedding space (--background-samples of them, at the same scale, prompt, depth and breadth)
hold in at least --generic-share of cases are dropped unless a specific continuation grows from
them (then they stay, marked "generic"). The background is built once per model and settings
and cached in $SAELAB_HOME/tree-backgrounds (saelab.interpret.tree_background); --unfiltered
shows the whole tree.

Prints the lists (and trees) per feature, or JSON with --json; writes no files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saelab.commands import options
from saelab.interpret.embedding import DEFAULT_PROMPT, definition_tree, feature_vectors, nearest_tokens
from saelab.interpret.tree_background import MIN_SHARE, BackgroundConfig, filter_tree, tree_background
from saelab.interpret.vocab import token_mask, token_strings


def register(subparsers) -> None:
    p = subparsers.add_parser("tokens", help="tokens near a feature's vectors in embedding space; definition tree",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, metavar="SAE", help="SAE folder (cfg.json + sae_weights.safetensors)")
    options.add_feature_list_options(p)
    p.add_argument("--vector", choices=("encoder", "decoder", "both"), default="both",
                   help="which feature vector (default: %(default)s; the tree uses encoder for both)")
    p.add_argument("--scale", type=float, default=1.0, help="distance from the origin in mean token norms")
    p.add_argument("--exponent", type=float, default=1.0, help="exponent on the cosine in the list score")
    p.add_argument("-k", type=int, default=20, help="tokens listed (default: %(default)s)")
    p.add_argument("--tree", action="store_true", help="also the definition tree of the ghost token")
    p.add_argument("--depth", type=int, default=3, help="tree depth in tokens (default: %(default)s)")
    p.add_argument("--breadth", type=int, default=3, help="children per node (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="tree prompt with <ghost> once (default: %(default)s)")
    g = p.add_argument_group("generic continuations (filtered from trees)")
    g.add_argument("--unfiltered", action="store_true", help="show the whole tree, generic continuations included")
    g.add_argument("--generic-share", type=_share, default=MIN_SHARE,
                   help="a continuation in at least this share of the background's trees is generic (default: %(default)s)")
    g.add_argument("--background-samples", type=options.positive_int, default=BackgroundConfig.n_samples,
                   help="random points in embedding space the background grows trees from (default: %(default)s)")
    options.add_model_options(p)
    p.set_defaults(func=run)


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    sae, lm = options.sae_and_lm(args)
    vocab = token_strings(lm.tokenizer, lm.W_E.shape[0])
    mask = token_mask(lm, lm.W_E.shape[0], lm.W_E.T, drop_unused=args.drop_unused, high_norm_z=args.drop_high_norm)
    which = ("encoder", "decoder") if args.vector == "both" else (args.vector,)
    # the tree vectors' radius is over all ids, as the background's (checks the features first)
    tree_vectors = feature_vectors(lm, sae, args.feature, which[0], args.scale) if args.tree else None
    background = None
    if args.tree and not args.unfiltered:
        background = tree_background(lm, BackgroundConfig(n_samples=args.background_samples, scale=args.scale,
                                                          depth=args.depth, breadth=args.breadth, prompt=args.prompt))
    out = []
    for n, j in enumerate(args.feature):
        item = {"feature": j, "scale": args.scale, "exponent": args.exponent}
        for w in which:
            v = feature_vectors(lm, sae, [j], w, args.scale, mask)
            ids, scores = nearest_tokens(lm, v, k=args.k, exponent=args.exponent, mask=mask)
            item[w] = [[vocab[t], s] for t, s in zip(ids[0].tolist(), scores[0].tolist())]
        if args.tree:
            item["tree"] = definition_tree(lm, tree_vectors[n], depth=args.depth, breadth=args.breadth,
                                           prompt=args.prompt)
            if background is not None:
                item["tree"] = filter_tree(item["tree"], background, args.generic_share)
        out.append(item)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for item in out:
        print(f"feature {item['feature']} (scale {args.scale}, exponent {args.exponent})")
        for w in which:
            print(f"  {w}: " + "  ".join(f"{t!r} {s:.3g}" for t, s in item[w]))
        if "tree" in item:
            shown = "whole" if background is None else f"without continuations in >= {args.generic_share:g} of " \
                                                         f"{background.n_trees} random points' trees"
            print(f"  definition tree ({which[0]} vector; {shown}):")
            _print_tree(item["tree"], "    ")
    return 0


def _print_tree(node: dict, indent: str) -> None:
    generic = f"  generic ({node['background']:.0%} of the background)" if node.get("generic") else ""
    print(f"{indent}{node['text']!r}  p={node['prob']:.3g}{generic}")
    for child in node["children"]:
        _print_tree(child, indent + "  ")
