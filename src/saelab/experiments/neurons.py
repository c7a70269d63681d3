"""Neurons against features (seed 004): a layer's MLP neurons through the same feature report and
dashboard as an SAE's features (interpret/neurons.py: the identity dictionary), and how many of
each are dead, dense or single-token, counted on the same held-out contexts with one set of
definitions:

    active        activation > 0 (a neuron's hidden value; an SAE feature's activation)
    dead          never active in the scan
    dense         active on more than DENSE_THRESHOLD (0.1) of the scanned tokens
    single-token  more than SINGLE_TOKEN_SHARE (0.9) of its activation mass (the sum of its
                  activations) on one token id (`FeatureScan.top_token_share`)

Output folder: the neurons' dashboard (index.html, report.json with each neuron's
top_token_share, features/), and census.json: the counts for the neurons and, when given, for
an SAE scanned on the same contexts (its report's index, compare_sae/report.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from saelab.atomic import write_json
from saelab.evals.metrics import DENSE_THRESHOLD
from saelab.interpret.dashboard import write_dashboard
from saelab.interpret.neurons import ARCH_LABEL, neuron_dictionary
from saelab.interpret.report import ReportOptions, build_report
from saelab.interpret.scan import SINGLE_TOKEN_SHARE, ScanConfig
from saelab.interpret.schema import Report
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import heldout_contexts
from saelab.sae import SAE
from saelab.tables import Column, format_rows


@dataclass
class NeuronsResult:
    report: Report  # the neurons'
    census: list[dict]  # `census_row` of the neurons, then of the SAE compared
    index: Path  # the dashboard's index.html


def census_row(name: str, report: Report, vocab: int) -> dict:
    """How many of a report's features are dead, dense and single-token, and their shares.
    `vocab`: the LM's embedding rows, to tell whether the scan's token table was exact."""
    s, n = report.stats(), max(len(report.features), 1)
    table_max = (report.options or {}).get("scan", {}).get("token_table_max", ScanConfig.token_table_max)
    return {"dictionary": name, "hook": report.sae.hook_name, "n": s.n, "dead": s.dead, "dead_frac": s.dead / n,
            "dense": s.dense, "dense_frac": s.dense / n, "single_token": s.single_token,
            "single_token_frac": None if s.single_token is None else s.single_token / n,
            "single_token_exact": report.sae.d_sae * vocab <= table_max, "n_tokens": report.n_tokens}


def _percent(v: float) -> str:
    return f"{100 * v:.1f}"


CENSUS = (Column("dictionary"), Column("hook"), Column("n"), Column("dead"), Column("dead_frac", "dead %", _percent),
          Column("dense"), Column("dense_frac", "dense %", _percent), Column("single_token", "single-token"),
          Column("single_token_frac", "single-token %", _percent), Column("bound", "single-token count"))


def format_census(rows: list[dict]) -> str:
    """The counts as a Markdown table, with the definitions under it."""
    shown = [{**r, "bound": "exact" if r["single_token_exact"] else "lower bound"} for r in rows]
    notes = (f"Active: > 0. Dense: active on more than {DENSE_THRESHOLD:g} of the {rows[0]['n_tokens']} scanned "
             f"tokens. Single-token: more than {SINGLE_TOKEN_SHARE:g} of the activation mass on one token id "
             "(a lower bound where the scan kept token slots rather than an exact table).")
    return f"{format_rows(shown, CENSUS, style='markdown')}\n\n{notes}\n"


def run_neurons(lm: HookedLM, layer: int, out_dir: str | Path, options: ReportOptions | None = None,
                compare: SAE | None = None, compare_name: str = "SAE", sign: int = 1,
                include_dead: bool = False, progress: bool | None = None) -> NeuronsResult:
    """The neurons' report and dashboard into `out_dir`, the SAE `compare` (if any) scanned on
    the same held-out contexts (its index written to compare_sae/), and census.json."""
    opts = options or ReportOptions()
    out = Path(out_dir)
    contexts = heldout_contexts(lm, opts.corpus, opts.n_contexts, opts.context_length,
                                progress=progress)
    report = build_report(neuron_dictionary(lm, layer, sign), lm, contexts, options=opts, progress=progress)
    report.sae = dataclasses.replace(report.sae, arch=ARCH_LABEL if sign > 0 else f"{ARCH_LABEL} (negative side)")
    index = write_dashboard(report, out, include_dead=include_dead, progress=progress)
    vocab = lm.W_E.shape[0]
    census = [census_row(f"layer {layer} neurons", report, vocab)]
    if compare is not None:
        other = build_report(compare, lm, contexts, options=dataclasses.replace(opts, features=[]), progress=progress)
        write_dashboard(other, out / "compare_sae", progress=progress)
        census.append(census_row(compare_name, other, vocab))
    write_json(out / "census.json", {"layer": layer, "sign": sign, "dense_threshold": DENSE_THRESHOLD,
                                     "single_token_share": SINGLE_TOKEN_SHARE, "rows": census})
    return NeuronsResult(report, census, index)
