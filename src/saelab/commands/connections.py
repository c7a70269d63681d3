"""`saelab connections EARLY LATE`: how the features of a dictionary at an earlier layer drive
those of one at a later layer (two SAEs, two transcoders, or one of each, of one model).

The model runs with EARLY spliced in as its features plus an error node (x = decode(f) + error,
so nothing changes and nothing is hidden); LATE encodes its own hook. For each late feature j
(the --top-late most active, or --features) the attribution to early feature i is activation x
gradient summed over tokens, A_ji = sum_s f_i(s) dF_j/df_i(s), F_j being j's total activation;
the error node gets its own. The --ablate strongest connections are rerun with the early feature
set to 0 and F_j's change is compared with A_ji: sign agreement and rank correlation.

Writes --out: connections.json (+ connections.schema.json) and index.html, a page listing each
strong connection with both features' top examples, linked to their dashboard pages
(<SAE>/dashboard/features/<i>.html unless --early-dashboard / --late-dashboard say where
`saelab dashboard` wrote them). Prints the table and the agreement. The text settings (--source,
--context-length, --include-bos, --outlier-multiple) are as typed, else as LATE's training text
recorded them, else the defaults shown."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.experiments.connections import ConnectionsConfig, check_layer_order, run_connections
from saelab.experiments.connections_view import format_text, write_outputs
from saelab.lm.resolve import heldout_contexts, load_lm
from saelab.sae import SAE

CONTEXTS = 32
CONTEXT_LENGTH = 64


def register(subparsers) -> None:
    d = ConnectionsConfig()
    p = subparsers.add_parser("connections", help="attribution (activation x gradient) from early to late features, "
                              "checked by ablation; HTML page", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("early", type=Path, metavar="EARLY", help="SAE or transcoder folder at the earlier layer")
    p.add_argument("late", type=Path, metavar="LATE", help="SAE or transcoder folder at the later layer")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="late features to attribute (default: the --top-late most active)")
    p.add_argument("--top-late", type=options.positive_int, default=d.n_late,
                   help=f"late features picked by total activation without --features (default: {d.n_late})")
    p.add_argument("--ablate", type=int, default=d.n_ablate,
                   help=f"strongest connections confirmed by ablation (default: {d.n_ablate})")
    p.add_argument("--per-late", type=int, default=d.per_late,
                   help=f"strongest early features listed per late feature (default: {d.per_late})")
    p.add_argument("--examples", type=int, default=d.n_examples,
                   help=f"top contexts shown per feature on the page (default: {d.n_examples})")
    p.add_argument("--feature-chunk", type=options.positive_int, default=d.feature_chunk,
                   help=f"late features per backward pass (memory: contexts x this; default: {d.feature_chunk})")
    p.add_argument("--early-dashboard", type=Path, default=None, help="EARLY's dashboard folder (default: EARLY/dashboard)")
    p.add_argument("--late-dashboard", type=Path, default=None, help="LATE's dashboard folder (default: LATE/dashboard)")
    options.add_out(p, "<LATE folder>/connections")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, from_sae=True)
    options.add_eval_contexts(g, CONTEXTS)
    options.add_context_length(g, CONTEXT_LENGTH, from_sae=True)
    options.add_lm_batch_size(g, d.batch_size)
    options.add_include_bos(g, from_sae=True)
    options.add_outlier_multiple(g, d.outlier_multiple, "neither nodes nor targets (a row flagged at either hook)",
                                 from_sae=True)
    options.defaults_apart(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    early, late = SAE.load(args.early).eval(), SAE.load(args.late).eval()
    check_layer_order(early, late)
    args = options.for_sae(args, late)  # typed, else LATE's recorded text settings, else the defaults
    cfg = ConnectionsConfig(late_features=args.features, n_late=args.top_late, n_ablate=args.ablate,
                            per_late=args.per_late, n_examples=args.examples, batch_size=args.lm_batch_size,
                            feature_chunk=args.feature_chunk, exclude_bos=not args.include_bos,
                            outlier_multiple=args.outlier_multiple)
    lm = load_lm(args.model, late, device=args.device, dtype=args.dtype)
    contexts = heldout_contexts(lm, args.source, args.eval_contexts, min(args.context_length, lm.context_length))
    result = run_connections(lm, early.to(lm.device), late.to(lm.device), contexts, cfg,
                             dashboards=(args.early_dashboard, args.late_dashboard), folders=(args.early, args.late))
    out = args.out or args.late / "connections"
    index = write_outputs(result, out)
    print(format_text(result), end="")
    print(f"wrote {out}/connections.json and {index}")
    return 0
