"""`saelab dashboard RUN_OR_SAE`: the static HTML feature dashboard of an SAE, or of every SAE of a
run (its saes/*). The feature report (max-activating and quantile examples, logit lens, ablated
text, embedding-space token lists, optionally definition trees) is computed by
`saelab.interpret.report.build_report` and written as index.html + features/<i>.html, with the
same data as report.json + features/<i>.json beside them. Prints the path of each index.html;
open it from disk, no server or network needed.

Examples come from held-out text run through the model (--source), or from an activation cache
(--cache): then the scan and the examples' activations are read from the cache, not recomputed
(the model still runs for ablated text and trees). Give a cache of HELD-OUT text made by the
SAE's model with its hook, e.g. one `saelab cache --hooks HOOK --out DIR` writes; a training
run's own cache holds its train split, so a run folder never uses it by default.

Text, context length, BOS and outlier rules default to those each SAE was trained with (its
recorded provenance), else the defaults shown. Activation rows the outlier rule flags
(massive activations) are not scanned; the index says how many were skipped."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.data.cache.read import open_cache
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.interpret.dashboard import write_dashboard
from saelab.interpret.report import TREE_VECTORS, ReportOptions, build_report
from saelab.lm.resolve import load_lm, model_name_for
from saelab.sae import SAE
from saelab.sae.format import sae_folders


def register(subparsers) -> None:
    d = ReportOptions()
    p = subparsers.add_parser("dashboard", help="static HTML dashboard of an SAE's features (opens offline, file://)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, metavar="RUN_OR_SAE",
                   help="an SAE folder (cfg.json + sae_weights.safetensors) or a run folder (every SAE in saes/)")
    options.add_out(p, "<SAE folder>/dashboard; for a run, <run>/dashboard/<SAE name>")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="features to give pages (default: all); every feature is in the index")
    p.add_argument("--include-dead", action="store_true", help="also write pages for dead features")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, d.corpus, from_sae=True)
    g.add_argument("--cache", type=Path, default=None, metavar="PATH",
                   help="activation cache of held-out text to scan instead of --source (made by the SAE's model, "
                        "with its hook; not a training run's cache, which holds the train split)")
    g.add_argument("--scan-contexts", type=options.positive_int, default=None,
                   help=f"held-out contexts to scan for examples (default: {d.n_contexts}; with --cache, all of "
                        "the cache's)")
    options.add_context_length(g, d.context_length, from_sae=True)
    options.add_lm_batch_size(g, d.batch_size)
    options.add_include_bos(g, from_sae=True)
    options.add_outlier_multiple(g, DEFAULT_MULTIPLE, "not scanned for examples or densities", from_sae=True)
    _add_view_args(p.add_argument_group("views (defaults as in ReportOptions)"), d)
    options.defaults_apart(p)
    p.set_defaults(func=run)


def _add_view_args(g, d: ReportOptions) -> None:
    g.add_argument("--tree", action="store_true", help="also grow definition trees (slow: forwards per feature)")
    g.add_argument("--tree-vector", choices=TREE_VECTORS, default=d.tree_vector,
                   help="feature vector the ghost token is made of (both: two trees and their overlap)")
    g.add_argument("--tree-depth", type=int, default=d.tree_depth)
    g.add_argument("--tree-breadth", type=int, default=d.tree_breadth)
    g.add_argument("--tree-scale", type=float, default=d.tree_scale, help="ghost vector norm in mean token norms")
    g.add_argument("--ablate", type=int, default=d.n_ablate, help="top examples per feature with ablated text")
    g.add_argument("--ablate-quantile", type=int, default=d.n_ablate_quantile,
                   help="quantile examples per feature with ablated text")
    g.add_argument("--ablate-back", type=int, default=d.ablate_max_back,
                   help=f"earlier tokens removed in turn (0: all of them; default: {d.ablate_max_back})")
    g.add_argument("--embedding-scale", type=float, default=d.embedding_scale,
                   help="feature vector norm in mean token norms, for the nearest-token lists")
    g.add_argument("--embedding-exponent", type=float, default=d.embedding_exponent,
                   help="exponent on the cosine in the nearest-token score")
    options.add_drop_high_norm(g, d.high_norm_z)
    g.add_argument("--window", type=int, nargs=2, default=d.window, metavar=("BEFORE", "AFTER"),
                   help="keep only these many tokens around each example (default: whole contexts)")


def view_options(args: argparse.Namespace) -> dict:
    """ReportOptions fields from the view arguments."""
    return dict(tree=args.tree, tree_vector=args.tree_vector, tree_depth=args.tree_depth,
                tree_breadth=args.tree_breadth, tree_scale=args.tree_scale, n_ablate=args.ablate,
                n_ablate_quantile=args.ablate_quantile, ablate_max_back=args.ablate_back or None,
                embedding_scale=args.embedding_scale, embedding_exponent=args.embedding_exponent,
                high_norm_z=args.drop_high_norm, window=tuple(args.window) if args.window else None,
                exclude_bos=not args.include_bos, outliers=OutlierRule(args.outlier_multiple))


def out_dirs(path: Path, folders: list[Path], out: Path | None) -> list[Path]:
    """Where each SAE's dashboard goes: --out itself for one SAE, one subfolder per SAE for a run."""
    if folders == [Path(path)]:
        return [out or Path(path) / "dashboard"]
    root = out or Path(path) / "dashboard"
    return [root / folder.name for folder in folders]


def run(args: argparse.Namespace) -> int:
    folders = sae_folders(args.path)
    common = options.filled(args)
    cache = open_cache(common.cache) if common.cache is not None else None  # checked per SAE
    n_contexts = common.scan_contexts if common.scan_contexts is not None or cache is not None else ReportOptions.n_contexts
    lms = {}  # one load per model: a run's SAEs share theirs
    for folder, out in zip(folders, out_dirs(args.path, folders, args.out)):
        sae = SAE.load(folder).eval()
        mine = options.for_sae(args, sae)  # the text settings this SAE records, unless typed
        name = model_name_for(mine.model, sae)
        if name not in lms:
            lms[name] = load_lm(mine.model, sae, device=mine.device, dtype=mine.dtype)
        report = build_report(folder, lms[name], features=mine.features, n_contexts=n_contexts,
                              context_length=mine.context_length, corpus=mine.source, cache=cache,
                              batch_size=mine.lm_batch_size, **view_options(mine))
        print(write_dashboard(report, out, include_dead=mine.include_dead), flush=True)
    return 0
