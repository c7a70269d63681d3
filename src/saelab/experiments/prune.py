"""Prune high-frequency features to a target L0 and recompute the SAE's statistics (seed 000).

The researchers' experiment: "I killed all features of frequency larger than 0.038. This was
2041 features, and resulted in a L0 just below 40", then compared MSE and % loss recovered with
an SAE trained to that L0 by a larger L1 penalty. Since L0 = sum of feature densities, killing
features in order of decreasing density lowers L0 by exactly each one's density (on the tokens
the densities were measured on): the cut-off is found in closed form, then measured again on
the evaluation tokens.

A killed feature has its encoder column, encoder bias and decoder row set to zero, so it never
fires and the pruned SAE saves and loads like any other. Features of relu, jumprelu and
batchtopk SAEs (at inference) fire independently, so the others are untouched. A topk SAE is
refused: killing a feature frees its slot for the next one, so L0 would not fall (train with a
smaller k instead).

`run_prune` is the whole experiment: measure the densities on held-out tokens, plan and prune
each target, evaluate the original and every pruned SAE on the LM, and write metrics.json
(rows named "original" and "pruned_l0<T>", with the plan's columns), the L0 / loss-recovered
plot (a trained sweep beside it with `compare`: one curve per architecture and width, each
point labelled with its k or coefficient; the note under the title says what each family was
evaluated on) and, with `save`, each pruned SAE's folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab.data.outliers import OutlierRule
from saelab.data.provenance import rule_for
from saelab.errors import ConfigError
from saelab.evals.entry import Extra, MetricsEntry, read_metrics, recovered_column, with_outlier_columns, write_metrics
from saelab.evals.reconstruction import evaluate_on_lm, evaluate_saes, lm_batches
from saelab.lm.hooked import HookedLM
from saelab.plots import plot_l0_vs_loss_recovered
from saelab.sae import SAE
from saelab.sae.architectures import names_where
from saelab.tables import format_rows
from saelab.train.spec import TrainSpec

COLUMNS = ("name", "n_killed", "density_cutoff", "l0", "mse", "fvu", "ce_delta", "kl",
           recovered_column("loss_recovered"))
ORIGINAL = Extra({"n_killed": 0, "density_cutoff": None})  # the unpruned SAE's prune columns


@dataclass
class PrunePlan:
    target_l0: float
    killed: torch.Tensor  # (n_killed,) feature indices, most frequent first
    cutoff: float  # every feature with density > cutoff is killed
    expected_l0: float  # sum of the remaining densities

    def to_dict(self) -> dict:
        return {"target_l0": self.target_l0, "n_killed": int(self.killed.numel()), "density_cutoff": self.cutoff, "expected_l0": self.expected_l0}


def plan_pruning(density: torch.Tensor, target_l0: float) -> PrunePlan:
    """The fewest most-frequent features to kill so that sum(remaining density) < target_l0.

    Features of equal density are killed together (a density cut-off, as in the seed)."""
    if target_l0 <= 0:
        raise ConfigError(f"target L0 must be positive, got {target_l0}")
    density = density.double()
    order = torch.argsort(density, descending=True, stable=True)
    sorted_d = density[order]
    remaining = density.sum() - torch.cumsum(sorted_d, 0)  # L0 after killing the first i+1
    if float(density.sum()) < target_l0:
        return PrunePlan(target_l0, order[:0], float(sorted_d[0]) if len(sorted_d) else 0.0, float(density.sum()))
    n = int(torch.nonzero(remaining < target_l0)[0]) + 1
    while 0 < n < len(sorted_d) and sorted_d[n] == sorted_d[n - 1]:
        n += 1  # a tie at the boundary: kill all equal features, so the rule is "density > cutoff"
    cutoff = float(sorted_d[n]) if n < len(sorted_d) else 0.0
    return PrunePlan(target_l0, order[:n], cutoff, float(sorted_d[n:].sum()))


@torch.no_grad()
def prune_features(sae: SAE, killed: torch.Tensor) -> SAE:
    """A copy of `sae` in which the `killed` features never fire and write nothing."""
    if sae.activation.per_token_k:
        raise ConfigError(f"pruning a {sae.cfg.arch} SAE frees each killed feature's slot for another feature, so L0 "
                          f"does not fall; prune {names_where(lambda c: not c.per_token_k)} SAEs, or train with a smaller k")
    out = copy.deepcopy(sae)
    if killed.numel():
        if int(killed.max()) >= sae.cfg.d_sae or int(killed.min()) < 0:
            raise ConfigError(f"feature indices must be in 0..{sae.cfg.d_sae - 1}")
        out.W_enc[:, killed] = 0.0
        out.b_enc[killed] = 0.0
        out.W_dec[killed] = 0.0
    out.cfg = copy.deepcopy(sae.cfg)
    out.cfg.metadata = {**sae.cfg.metadata, "pruned_features": int(killed.numel())}
    return out


@dataclass
class PruneConfig:
    target_l0: list[float]  # one pruned SAE per target
    label: str = "SAE"  # how the plot's title names the pruned SAE (e.g. its folder's name)
    compare: Path | None = None  # a run folder whose SAEs to plot beside the pruning curve
    save: bool = False  # also save each pruned SAE's folder
    source: str | None = None  # the text the held-out tokens come from, for the plot's note
    batch_size: int = 16  # contexts per LM forward pass
    exclude_bos: bool = True
    outliers: OutlierRule | None = None  # rows left out of densities and metrics; None: the SAE's rule

    def __post_init__(self) -> None:
        if not self.target_l0 or any(t <= 0 for t in self.target_l0):
            raise ConfigError(f"give one or more positive target L0 values, got {self.target_l0}")


@dataclass
class PruneResult:
    rows: list[MetricsEntry]  # the original first, then one per target
    plans: list[PrunePlan]
    out_dir: Path
    files: list[Path] = field(default_factory=list)  # what was written


def run_prune(lm: HookedLM, sae: SAE, tokens, out_dir: str | Path, cfg: PruneConfig) -> PruneResult:
    """The experiment into `out_dir` (see the module docstring): densities, plans and the
    evaluation of the original and each pruned SAE on `tokens` ((n, seq) held-out contexts)."""
    out = Path(out_dir)
    sweep = read_metrics(cfg.compare) if cfg.compare is not None else None  # fail before the work
    sae.eval()
    opts = dict(batch_size=cfg.batch_size, exclude_bos=cfg.exclude_bos)
    rule = rule_for(sae, cfg.outliers)
    [measured] = evaluate_saes([sae], lm_batches(lm, [sae], tokens, **opts), outliers=rule)
    plans = [plan_pruning(measured.density, t) for t in cfg.target_l0]
    variants = [sae] + [prune_features(sae, plan.killed) for plan in plans]
    evaluations = evaluate_on_lm(lm, variants, tokens, outliers=rule, **opts)
    names = ["original"] + [f"pruned_l0<{plan.target_l0:g}" for plan in plans]
    rows = [MetricsEntry(name, ev.recon, ev.downstream, extra=[columns])
            for name, ev, columns in zip(names, evaluations, [ORIGINAL, *plans])]
    files = [write_metrics(out, rows)]
    if cfg.save:
        files += [variant.save(out / f"pruned_l0_{plan.target_l0:g}") for variant, plan in zip(variants[1:], plans)]
    family = f"{sae.cfg.arch} x{sae.cfg.d_sae / sae.cfg.d_in:g}"
    series = {f"pruned {family} (this SAE)": _points(rows, lambda r: r.name.replace("pruned_", ""))}
    if sweep is not None:
        series.update(sweep_series(sweep, sae.cfg.d_in))
    note = evaluation_note(rows, tokens, cfg.source, sweep)
    files.append(plot_l0_vs_loss_recovered(series, out / "l0_vs_loss_recovered.png", title=f"pruning {cfg.label}",
                                           note=note))
    return PruneResult(rows, plans, out, files)


def _points(rows: list[MetricsEntry], label) -> list[tuple[float, float, str, float]]:
    """(L0, loss recovered, label(row), CE increase) of the rows that have a loss recovered."""
    return [(r.recon.l0, r.downstream.loss_recovered, label(r), r.downstream.ce_delta)
            for r in rows if r.downstream is not None and r.downstream.loss_recovered is not None]


def sweep_series(sweep: list[MetricsEntry], d_in: int) -> dict[str, list[tuple]]:
    """A training run's rows as plot series, one per family: "trained relu x4", "trained topk
    x8", ... (architecture and width; a row without a spec goes under "trained"), each point
    labelled with its k or coefficient, so each family is its own curve along its penalty."""
    series: dict[str, list[tuple]] = {}
    for row in sweep:
        spec = TrainSpec.from_dict(row.spec) if row.spec else None
        family = "trained" if spec is None else f"trained {spec.arch} x{row.recon.d_sae / d_in:g}"
        series.setdefault(family, []).extend(_points([row], lambda r: spec.knob() if spec else r.name))
    return {name: points for name, points in sorted(series.items()) if points}


def evaluation_note(rows: list[MetricsEntry], tokens, source: str | None, sweep: list[MetricsEntry] | None) -> str:
    """What the points were evaluated on: the pruned SAEs' held-out contexts and predictions, and
    the trained sweep's own evaluation (read from its metrics.json) when it is plotted too."""
    n, length = tokens.shape
    predicted = next((r.downstream.downstream_tokens for r in rows if r.downstream is not None), None)
    text = (f"pruned: {n} held-out contexts{f' of {source}' if source else ''} x {length} tokens, "
            f"{predicted} predictions")
    if sweep:
        theirs = sorted({r.downstream.downstream_tokens for r in sweep if r.downstream is not None})
        same = " (the same count)" if theirs == [predicted] else ""
        text += f"; trained: their run's own evaluation, {', '.join(map(str, theirs))} predictions{same}"
    return text


def format_prune(result: PruneResult) -> str:
    """The table of the original and each pruned SAE (killed features, cut-off, L0, MSE, FVU,
    loss recovered, KL)."""
    return format_rows(result.rows, with_outlier_columns(COLUMNS, result.rows))
