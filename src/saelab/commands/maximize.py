"""`saelab maximize SAE --feature I`: synthetic max-activating text. A beam search over tokens,
guided by the language model's likely continuations and by the gradient of the feature's
pre-activation, finds short texts (at most --length tokens after BOS) whose last token
activates the feature most, with a term keeping them likely under the model (--lm-weight);
coordinate search then refines them. Prints each text with the activation it reaches beside
the dataset's top example (from --dashboard, else a scan of held-out text), and says why when
the search does not beat it.

Writes the output folder (--out; default: beside the SAE, <SAE>-maximize-<I>, or in the run folder
for an SAE of a run's saes/): maximize.json and
maximize.html (the texts and the dataset's top example, shaded on one scale).
With --dashboard it also puts the texts on the feature's dashboard page, beside its top examples."""

from __future__ import annotations

import argparse

from saelab.commands import options
from saelab.experiments.maximize import (MaximizeConfig, Scorer, dataset_top_from_dashboard, dataset_top_from_scan,
                                         format_maximize, run_maximize)

SCAN_CONTEXTS = 128


def register(sub) -> None:
    d = MaximizeConfig(feature=0)
    p = sub.add_parser("maximize", help="synthetic max-activating text for a feature (LM-guided token search)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", metavar="SAE", help="SAE folder (saelab or SAELens layout) with cfg.hook_name")
    p.add_argument("--feature", type=int, required=True, help="the feature's index")
    g = p.add_argument_group("the search")
    g.add_argument("--length", type=options.positive_int, default=d.length, help=f"tokens after BOS, at most (default: {d.length})")
    g.add_argument("--beam", type=options.positive_int, default=d.beam, help=f"texts kept per step (default: {d.beam})")
    g.add_argument("--lm-candidates", type=int, default=d.lm_candidates,
                   help=f"the model's most likely next tokens tried per text (default: {d.lm_candidates})")
    g.add_argument("--grad-candidates", type=int, default=d.grad_candidates,
                   help=f"tokens with the largest activation gradient tried per text and position (default: {d.grad_candidates})")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight,
                   help="activation traded per nat of the text's mean log-probability; 0: activation alone "
                        f"(default: {d.lm_weight:g})")
    g.add_argument("--refine-rounds", type=int, default=d.refine_rounds,
                   help=f"rounds of coordinate search after the beam (default: {d.refine_rounds})")
    g.add_argument("--top", type=options.positive_int, default=d.top, help=f"texts reported (default: {d.top})")
    g = p.add_argument_group("the dataset's top example")
    g.add_argument("--dashboard", default=None, metavar="DIR",
                   help="this SAE's `saelab dashboard` folder: its top example is the one to beat, and the texts go on "
                        "the feature's page")
    options.add_scan_contexts(g, f"{SCAN_CONTEXTS}, when no --dashboard")
    options.add_source(g, from_sae=True)
    options.add_context_length(g, None, from_sae=True)
    options.add_out(p, "<SAE>-maximize-<I> beside the SAE (in the run folder for an SAE of a run's saes/)")
    options.add_model_options(p)
    options.defaults_apart(p, keep=("out", "sae", "feature"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saelab.atomic import write_json
    from saelab.experiments.maximize_view import write_maximize_page
    from saelab.interpret.dashboard import write_synthetic
    from saelab.lm.resolve import heldout_contexts

    sae, lm = options.sae_and_lm(options.filled(args))
    args = options.for_sae(args, sae)  # the text settings the SAE records, unless typed
    out = args.out or options.check_out(options.beside_sae(args.sae, f"maximize-{args.feature}"),
                                        "the default output folder")
    cfg = MaximizeConfig(feature=args.feature, length=args.length, beam=args.beam, lm_candidates=args.lm_candidates,
                         grad_candidates=args.grad_candidates, lm_weight=args.lm_weight,
                         refine_rounds=args.refine_rounds, top=args.top)
    if args.dashboard:
        dataset = dataset_top_from_dashboard(args.dashboard, args.feature)
    else:
        contexts = heldout_contexts(lm, args.source, args.scan_contexts or SCAN_CONTEXTS, args.context_length)
        dataset = dataset_top_from_scan(Scorer(lm, sae, args.feature), contexts)
    result = run_maximize(lm, sae, cfg, args.sae, dataset)
    print(format_maximize(result))
    write_json(out / "maximize.json", result.to_dict())
    write_maximize_page(result.to_dict(), out, args.dashboard)
    print(f"\nwrote {out}/maximize.json and maximize.html")
    if args.dashboard:
        print(f"and the texts on {write_synthetic(args.dashboard, args.feature, result.to_dict())}")
    return 0
