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
from saelab.data.outliers import DEFAULT_MULTIPLE
from saelab.interpret.dashboard import write_dashboard
from saelab.interpret.report import ReportOptions, build_report
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
    options.add_feature_pages(p)
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g, d.corpus, from_sae=True)
    g.add_argument("--cache", type=Path, default=None, metavar="PATH",
                   help="activation cache of held-out text to scan instead of --source (made by the SAE's model, "
                        "with its hook; not a training run's cache, which holds the train split)")
    options.add_scan_contexts(g, f"{d.n_contexts}; with --cache, all of the cache's")
    options.add_context_length(g, d.context_length, from_sae=True)
    options.add_lm_batch_size(g, d.batch_size)
    options.add_include_bos(g, from_sae=True)
    options.add_outlier_multiple(g, DEFAULT_MULTIPLE, "not scanned for examples or densities", from_sae=True)
    options.add_report_views(p.add_argument_group("views (defaults as in ReportOptions)"), d)
    options.defaults_apart(p)
    p.set_defaults(func=run)


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
                              batch_size=mine.lm_batch_size, **options.report_view_options(mine))
        print(write_dashboard(report, out, include_dead=mine.include_dead), flush=True)
    return 0
