"""`saelab neurons --layer L`: the feature report and static dashboard of a layer's own MLP neurons,
in the same views as `saelab dashboard` gives an SAE's features (examples, quantiles, logit lens,
ablated text, density), so neurons and features can be compared side by side (seed 004).

Neuron i is read at blocks.L.mlp.hook_post and counts as active where its value is > 0 (as a
neuron "fires"; GELU / SiLU neurons go slightly negative and a gated MLP's hidden value is
signed: those values count as 0; --negative reads the negative side instead). Its logit lens
reads its output weights (row i of W_out), the direction it writes into the residual stream.

Prints how many neurons are dead, dense (active on > 10% of tokens) and single-token (> 90% of
their activation mass on one token id), and the same for --compare-sae, an SAE of the same model
(e.g. at the same layer's MLP output or residual stream) scanned on the same contexts. Writes
--out (default: runs/neurons-L<L>): index.html, report.json (each neuron's top_token_share),
features/, census.json, and compare_sae/ (the SAE's index) with --compare-sae."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.data.outliers import DEFAULT_MULTIPLE
from saelab.experiments.neurons import format_census, run_neurons
from saelab.interpret.report import ReportOptions
from saelab.lm.resolve import check_sae_fits, load_lm
from saelab.sae import SAE


def register(subparsers) -> None:
    d = ReportOptions()
    p = subparsers.add_parser("neurons", help="dashboard of a layer's MLP neurons, counted against an SAE's features",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, required=True, help="the layer whose MLP neurons are reported")
    p.add_argument("--compare-sae", type=Path, default=None, metavar="SAE",
                   help="an SAE folder of the same model: its dead / dense / single-token counts on the same contexts")
    p.add_argument("--negative", action="store_true",
                   help="report the negative side of each neuron (active where its value is < 0)")
    options.add_out(p, "runs/neurons-L<layer>")
    options.add_feature_pages(p)
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, d.corpus)
    options.add_scan_contexts(g, str(d.n_contexts))
    options.add_context_length(g, d.context_length)
    options.add_lm_batch_size(g, d.batch_size)
    options.add_include_bos(g)
    options.add_outlier_multiple(g, DEFAULT_MULTIPLE, "not scanned for examples or densities")
    options.add_report_views(p.add_argument_group("views (defaults as in ReportOptions)"), d)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sae = SAE.load(args.compare_sae).eval() if args.compare_sae is not None else None
    opts = ReportOptions(features=args.features, n_contexts=args.scan_contexts or ReportOptions.n_contexts,
                         context_length=args.context_length, corpus=args.source, batch_size=args.lm_batch_size,
                         **options.report_view_options(args))
    lm = load_lm(args.model, sae, device=args.device, dtype=args.dtype)
    if sae is not None:
        check_sae_fits(lm, sae)
    out = args.out or Path(f"runs/neurons-L{args.layer}")
    result = run_neurons(lm, args.layer, out, opts, compare=sae, compare_name=str(args.compare_sae),
                         sign=-1 if args.negative else 1, include_dead=args.include_dead)
    print(format_census(result.census), end="")
    print(f"wrote {result.index} (and census.json beside it)")
    return 0
