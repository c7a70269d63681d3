"""Prune a too-low-penalty SAE to an L0, or train with the penalty that reaches it? (seed 000)

The researchers' question: "If you removed the high-frequency features to achieve some L0 X,
how much does loss recovered change? If you increased the L1 penalty to achieve L0 X, how does
loss recovered change?" For each target L0 this builds both SAEs, of one width and architecture:

    pruned    the base SAE (trained with a too-low coefficient, or given) with its densest
              features killed until L0 < target: `saelab.experiments.prune.run_prune`, as is
    trained   an SAE trained with the coefficient that reaches the target, found by bisection
              in log space (`coefficient_search`): every round's runs train together in one
              GroupTrainer pass (`run_lm_sweep`), then a full run at the coefficient found

and evaluates both on the same held-out contexts (MSE, CE increase, % loss recovered), then
finds where the two curves cross (`crossing`), per metric. All runs train on the same text,
with the same recipe (`sweep_specs` at the run's steps) and one activation cache.

Run folder: cache/ (shared), base/, search/ and trained/ (one run_lm_sweep folder per pass,
named by its coefficients, each resumable), pruned/ (run_prune's), metrics.json (every row:
base, pruned, trained, with a `family` column), frontier.json (the typed result), frontier.png
(L0 against loss recovered, MSE and CE increase) and table.txt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saelab.atomic import write_json, write_text
from saelab.errors import ConfigError
from saelab.evals.entry import MetricsEntry, recovered_column, write_metrics
from saelab.evals.reconstruction import evaluate_on_lm
from saelab.experiments.coefficient_search import CoefficientSearch, search_coefficients
from saelab.experiments.crossing import METRICS, Crossing, curve_crossing
from saelab.experiments.prune import PruneConfig, run_prune
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import heldout_contexts
from saelab.pipelines.train_lm import LMSweepConfig, middle_hook, run_lm_sweep
from saelab.plots import plot_l0_vs_loss_recovered
from saelab.sae import SAE
from saelab.sae.architectures import architecture, names_where
from saelab.sae.config import ArchOptions
from saelab.tables import Column, format_rows
from saelab.train.spec import TrainSpec
from saelab.train.sweep import SweepGrid, sweep_specs

TABLE = (Column("name"), Column("family"), Column("target_l0", "target", "g"), Column("coefficient", "coef", ".4g"),
         Column("l0", fmt=".1f"), Column("mse", fmt=".4g"), Column("fvu", fmt=".4f"), Column("ce_delta", "CE +", ".4f"),
         Column("kl", "KL", ".4f"), recovered_column("loss_recovered", "loss rec."))


@dataclass
class FrontierConfig:
    """The targets, the SAE family (used when the base is trained here) and how it is trained
    and searched. Defaults run on the offline default LM in a few minutes on 2 CPU cores."""

    target_l0: list[float] = field(default_factory=lambda: [30.0, 60.0, 120.0])
    arch: str = "relu"
    expansion: float = 4.0
    d_sae: int | None = None  # instead of expansion
    base_coefficient: float = 0.5  # the too-low penalty of the base SAE trained here
    coefficient_range: tuple[float, float] | None = None  # bisection bounds; None: base c .. 64 * base c
    steps: int = 300
    search_steps: int | None = None  # the bisection's runs; None: `steps` (their SAEs then serve as full runs)
    search_rounds: int = 4
    tolerance: float = 0.1  # a target is reached when |L0 - target| <= tolerance * target
    hook: str | None = None  # None: the middle layer's resid_post (a given SAE's own hook wins)
    source: str = "stdlib"
    context_length: int = 128
    train_contexts: int = 1024
    eval_contexts: int = 32
    batch_tokens: int = 1024
    seed: int = 0
    device: str = "cpu"
    lm_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.target_l0 or any(t <= 0 for t in self.target_l0):
            raise ConfigError(f"give one or more positive target L0 values, got {self.target_l0}")
        if self.base_coefficient <= 0 or self.tolerance <= 0:
            raise ConfigError("base_coefficient and tolerance must be positive")

    @property
    def short_steps(self) -> int:
        return self.search_steps or self.steps


@dataclass
class FrontierColumns:
    """A frontier row's own columns: its family (base, pruned, trained) and, for trained rows,
    the target, coefficient and the L0 its search run reached. Absent values are left out
    (pruned rows carry target_l0 in the prune plan's columns)."""

    family: str
    target_l0: float | None = None
    coefficient: float | None = None
    search_l0: float | None = None
    converged: bool | None = None
    sae_path: str | None = None  # where the trained SAE is saved

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Family:
    """The SAEs both families share: the architecture, its settings and the width."""

    arch: str
    d_sae: int
    options: dict  # ArchOptions fields that differ from their defaults

    @classmethod
    def of(cls, sae: SAE) -> Family:
        defaults = {f.name: f.default for f in dataclasses.fields(ArchOptions)}
        options = {k: v for k, v in sae.cfg.arch_options().items() if k != "arch" and v != defaults[k]}
        return cls(sae.cfg.arch, sae.cfg.d_sae, options)

    def check(self) -> None:
        if architecture(self.arch).knob == "k":
            raise ConfigError(f"frontier searches the sparsity coefficient, and {self.arch} SAEs set their L0 with k; "
                              f"use {names_where(lambda c: c.knob != 'k')}")

    def specs(self, coefficients: list[float], steps: int) -> list[TrainSpec]:
        grid = SweepGrid(arch=[self.arch], expansion=[], d_sae=[self.d_sae], coefficient=list(coefficients))
        return sweep_specs(grid, steps, **self.options)


@dataclass
class FrontierResult:
    rows: list[MetricsEntry]  # the base, then pruned and trained rows by target
    searches: list[CoefficientSearch]
    crossings: list[Crossing]
    hook: str
    base_path: str
    out_dir: Path
    config: dict = field(default_factory=dict)  # the FrontierConfig, as a dict
    files: list[Path] = field(default_factory=list)

    def family(self, name: str) -> list[MetricsEntry]:
        return [r for r in self.rows if r.get("family") == name]

    def to_dict(self) -> dict:
        return {"config": self.config, "hook": self.hook, "base": self.base_path,
                "searches": [s.to_dict() for s in self.searches],
                "crossings": [c.to_dict() for c in self.crossings], "rows": [r.to_dict() for r in self.rows]}


class FamilyRuns:
    """Trains members of the family: one `run_lm_sweep` pass (GroupTrainer) per call into a
    folder named by its coefficients, remembering each (coefficient, steps)'s row and folder,
    so nothing is trained twice and a rerun resumes every pass."""

    def __init__(self, lm: HookedLM, out: Path, cfg: FrontierConfig, family: Family, hooks: tuple[str, str | None]):
        self.lm, self.out, self.cfg, self.family = lm, out, cfg, family
        self.known: dict[tuple[float, int], tuple[MetricsEntry, Path]] = {}
        self.settings = dict(model=lm.name, hook=hooks[0], hook_out=hooks[1], source=cfg.source,
                             context_length=cfg.context_length, train_contexts=cfg.train_contexts,
                             eval_contexts=cfg.eval_contexts, batch_size=cfg.batch_tokens, seed=cfg.seed,
                             device=cfg.device, lm_dtype=cfg.lm_dtype, cache_dir=str(out / "cache"))

    def rows(self, coefficients: list[float], steps: int, folder: str) -> list[MetricsEntry]:
        new = sorted({c for c in coefficients if (c, steps) not in self.known})
        if new:
            run_dir = self.out / folder / "_".join(f"c{c:g}" for c in new)
            sweep = LMSweepConfig(specs=self.family.specs(new, steps), steps=steps, **self.settings)
            for c, row in zip(new, run_lm_sweep(sweep, run_dir, self.lm)):
                self.known[(c, steps)] = (row, run_dir)
        return [self.known[(c, steps)][0] for c in coefficients]

    def l0s(self, coefficients: list[float]) -> list[float]:
        """The search's measure: L0 on the held-out contexts after `search_steps` steps."""
        return [row.recon.l0 for row in self.rows(coefficients, self.cfg.short_steps, "search")]

    def sae_path(self, coefficient: float, steps: int) -> Path:
        row, run_dir = self.known[(coefficient, steps)]
        return run_dir / "saes" / row.name


def run_frontier(lm: HookedLM, out_dir: str | Path, cfg: FrontierConfig, sae: SAE | None = None,
                 sae_path: str | Path | None = None) -> FrontierResult:
    """The experiment into `out_dir` (see the module docstring). `sae` (loaded from `sae_path`,
    which is never written to) is the base; without it a base is trained at base_coefficient.
    Unreachable targets fail before the long runs: above the base's L0 before any search run,
    outside what the coefficient range trains to after the two bound runs."""
    out = Path(out_dir)
    _check_out(out, sae_path)
    family = Family.of(sae) if sae is not None else _family(lm, cfg)
    family.check()
    hooks = (sae.cfg.hook_name, sae.cfg.hook_name_out) if sae is not None else (cfg.hook or middle_hook(lm), None)
    runs = FamilyRuns(lm, out, cfg, family, hooks)
    tokens = heldout_contexts(lm, cfg.source, cfg.eval_contexts, cfg.context_length)
    if sae is None:
        [base_row] = runs.rows([cfg.base_coefficient], cfg.steps, "base")
        sae_path = runs.sae_path(cfg.base_coefficient, cfg.steps)
        sae, base_l0, base_c = SAE.load(sae_path), base_row.recon.l0, cfg.base_coefficient
    else:
        [measured] = evaluate_on_lm(lm, [sae.to(lm.device)], tokens, downstream=False)
        base_l0, base_c = measured.recon.l0, sae.cfg.metadata.get("train", {}).get("coefficient")
    _check_prunable(base_l0, cfg.target_l0)
    searches = search_coefficients(runs.l0s, cfg.target_l0, *_bounds(cfg, base_c, sae_path),
                                   tolerance=cfg.tolerance, rounds=cfg.search_rounds)
    pruned = run_prune(lm, sae.to(lm.device).eval(), tokens, out / "pruned",
                       PruneConfig(target_l0=list(cfg.target_l0), label="base"))
    trained = runs.rows([s.coefficient for s in searches], cfg.steps, "trained")
    rows = _rows(pruned.rows, trained, searches, runs, base_c)
    crossings = [curve_crossing(_curve(rows, "pruned", key), _curve(rows, "trained", key), key, higher)
                 for key, higher in METRICS]
    result = FrontierResult(rows, searches, crossings, hooks[1] or hooks[0], str(sae_path), out, asdict(cfg))
    result.files = _write(result)
    return result


def _check_out(out: Path, sae_path) -> None:
    """The SAE read is never written: --out may not be it or hold it."""
    if sae_path is None:
        return
    sae, folder = Path(sae_path).resolve(), out.resolve()
    if sae == folder or folder in sae.parents:
        raise ConfigError(f"--out {out} would hold the SAE it reads ({sae_path}); choose another folder")


def _family(lm: HookedLM, cfg: FrontierConfig) -> Family:
    """The family of a base trained here: cfg.arch at cfg.d_sae, or cfg.expansion * d_in."""
    d_in = lm.hook_dim(cfg.hook or middle_hook(lm))
    return Family(cfg.arch, cfg.d_sae or int(round(cfg.expansion * d_in)), {})


def _check_prunable(base_l0: float, targets: list[float]) -> None:
    above = [t for t in targets if t >= base_l0]
    if above:
        raise ConfigError(f"target L0 {', '.join(f'{t:g}' for t in above)} cannot be reached by pruning: the base "
                          f"SAE's L0 is {base_l0:.4g} on these contexts, and pruning reaches L0 below it")


def _bounds(cfg: FrontierConfig, base_c: float | None, sae_path) -> tuple[float, float]:
    """The bisection's bounds: as given, else the base's coefficient and 64 times it."""
    if cfg.coefficient_range is not None:
        return tuple(cfg.coefficient_range)
    if not base_c:
        raise ConfigError(f"{sae_path} records no training coefficient; give the bisection's bounds "
                          "with --coefficient-range LOW HIGH")
    return base_c, 64 * base_c


def _rows(pruned: list[MetricsEntry], trained: list[MetricsEntry], searches: list[CoefficientSearch],
          runs: FamilyRuns, base_c: float | None) -> list[MetricsEntry]:
    """The base row, then per target its pruned and its trained row, each with its family's
    columns (copies: the rows of the runs keep their own)."""
    def tagged(row: MetricsEntry, name: str, columns: FrontierColumns) -> MetricsEntry:
        return dataclasses.replace(row, name=name, extra=[*row.extra, columns])
    rows = [tagged(pruned[0], "base", FrontierColumns("base", coefficient=base_c))]
    for p, t, s in zip(pruned[1:], trained, searches):
        search_l0 = next((l0 for c, l0 in s.points if c == s.coefficient), None)  # None: interpolated, not measured
        columns = FrontierColumns("trained", s.target_l0, s.coefficient, search_l0, s.converged,
                                  str(runs.sae_path(s.coefficient, runs.cfg.steps)))
        rows += [tagged(p, p.name, FrontierColumns("pruned")), tagged(t, f"trained_l0~{s.target_l0:g}", columns)]
    return rows


def _curve(rows: list[MetricsEntry], family: str, key: str) -> list[tuple[float, float]]:
    return [(r.recon.l0, r[key]) for r in rows if r.get("family") == family and r.get(key) is not None]


def _points(rows: list[MetricsEntry], family: str) -> list[tuple]:
    """Plot points (L0, loss recovered, label, CE increase, MSE) of one family's rows."""
    def label(r: MetricsEntry) -> str:
        if family == "base":
            return "base"
        return f"<{r['target_l0']:g}" if family == "pruned" else f"c{r['coefficient']:.3g}"
    return [(r.recon.l0, r.get("loss_recovered"), label(r), r.get("ce_delta"), r.recon.mse)
            for r in rows if r.get("family") == family]


def format_frontier(result: FrontierResult) -> str:
    """The table of every row, then one line per metric on where the families cross."""
    lines = [format_rows(result.rows, TABLE), ""]
    lines += [f"{c.metric}: {c.summary}" for c in result.crossings]
    return "\n".join(lines)


def _write(result: FrontierResult) -> list[Path]:
    """metrics.json, frontier.json, table.txt and frontier.png."""
    out = result.out_dir
    series = {"pruned from the base": _points(result.rows, "pruned"),
              "trained to the target": _points(result.rows, "trained"), "base (unpruned)": _points(result.rows, "base")}
    title = f"pruned vs trained to each L0 at {result.hook}"
    return [write_metrics(out, result.rows), write_json(out / "frontier.json", result.to_dict()),
            write_text(out / "table.txt", format_frontier(result) + "\n"),
            plot_l0_vs_loss_recovered(series, out / "frontier.png", title=title)]
