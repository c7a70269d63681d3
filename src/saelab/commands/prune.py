"""`saelab prune SAE --target-l0 40`: kill the most frequent features until L0 < target, then
recompute MSE, FVU, L0 and % loss recovered for the original and each pruned dictionary (seed
000). With `--compare RUN`, the SAEs of a training sweep (other L1 / k) are plotted beside the
pruning curve: L0 against loss recovered, pruned versus trained-sparser.

Writes the output folder (--out; default: beside the SAE, <SAE>-pruned): metrics.json (one entry
per dictionary), l0_vs_loss_recovered.png and, with --save, each pruned SAE folder; prints the
table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.commands import options
from saelab.errors import MissingFileError
from saelab.experiments.prune import plan_pruning, prune_features
from saelab.evals.lm_eval import evaluate_on_lm, reconstruction_metrics
from saelab.plots import plot_l0_vs_loss_recovered
from saelab.sae import SAE
from saelab.tables import format_rows

COLUMNS = ("name", "n_killed", "density_cutoff", "l0", "mse", "fvu", "loss_recovered", "kl")


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune high-frequency features to a target L0 and re-measure", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", help="SAE folder")
    p.add_argument("--target-l0", type=float, nargs="+", required=True, help="one or more target L0 values")
    p.add_argument("--compare", help="a run folder whose saes/ and metrics.json to plot beside the pruning curve")
    options.add_out(p, "{sae}-pruned")
    p.add_argument("--save", action="store_true", help="also save each pruned SAE folder")
    options.add_model_options(p)
    g = options.text_group(p)
    options.add_source(g)
    options.add_eval_contexts(g, options.EVAL_CONTEXTS)
    options.add_context_length(g, None)
    p.set_defaults(func=run)


def run(args) -> int:
    sae = SAE.load(args.sae).eval()
    lm, tokens = options.lm_and_eval_contexts(args, sae)
    sae.to(lm.device)
    density = reconstruction_metrics(lm, [sae], tokens, include_density=True)[0]["density"]
    plans = [plan_pruning(torch.tensor(density), t) for t in args.target_l0]
    variants = [sae] + [prune_features(sae, plan.killed) for plan in plans]
    entries = evaluate_on_lm(lm, variants, tokens)
    entries[0].update(name="original", n_killed=0, density_cutoff=None)
    for entry, plan in zip(entries[1:], plans):
        entry.update(name=f"pruned_l0<{plan.target_l0:g}", **plan.to_dict())
    out = options.output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.save:
        for variant, plan in zip(variants[1:], plans):
            variant.save(out / f"pruned_l0_{plan.target_l0:g}")
    write_json(out / "metrics.json", entries)
    print(format_rows(entries, COLUMNS))
    series = {"pruned (this SAE)": [(e["l0"], e["loss_recovered"], e["name"]) for e in entries]}
    if args.compare:
        series["trained sweep"] = _sweep_points(Path(args.compare))
    plot_l0_vs_loss_recovered(series, out / "l0_vs_loss_recovered.png", title=f"pruning {Path(args.sae).name}")
    print(f"\nwrote {out / 'metrics.json'} and {out / 'l0_vs_loss_recovered.png'}")
    return 0


def _sweep_points(run_dir: Path) -> list[tuple[float, float, str]]:
    path = run_dir / "metrics.json"
    if not path.exists():
        raise MissingFileError(f"{run_dir} has no metrics.json (a run folder from `saelab train` or `saelab quickstart`)")
    return [(e["l0"], e["loss_recovered"], e.get("name")) for e in json.loads(path.read_text()) if "loss_recovered" in e]
