"""How many features a layer holds (seed 001: "the layer had somewhere between 512-1024
features"): dictionaries of growing width on the same activations, each width's features
matched in the next, and the width where the matched count levels off.

A dictionary narrower than the N features the data holds spends nearly every latent on a real
feature, and the next width finds them again; a wider one adds duplicates, splits, composites
and dead latents, few features the next width agrees on. So m(w), the distinct features of
width w that width w' (the next) also has, grows fast with w and then nearly stops near N. Per
sparsity setting (knob):

1. one GroupTrainer pass trains every width (default 1x, 2x, 4x, 8x d_in): the toy pipeline
   for `saelab count --toy N`, the LM pipeline for `--model/--hook/--source`;
2. per width w and the next, each of w's alive decoder directions' (latents that fired on the
   held-out data) best cosine among w''s (`evals.metrics.max_cosine`, as `saelab compare`):
   MMCS, and m(w) = the *distinct* directions of w (`evals.metrics.distinct_rows`: a near-copy
   of an earlier direction counts once, else duplicates keep m(w) growing past N) whose match
   is above the threshold;
3. the estimate (`experiments.saturation`): m(w*) at the first width w* whose next doubling
   adds under 40% new matched features (why this rule and not a fitted plateau: there). The count levels off only past N, so the sweep sees N only if N is
   at most its third-widest width: with 1x-8x, N <= 2 d_in; for the 512-1024 features seed
   001 reports in 64 MLP dimensions, widths up to 32x.

On toy data the same run has the truth, so `saelab count --toy N` prints the estimate beside N
and each width's true features recovered beside m(w): how far to trust the estimate elsewhere.
Writes count.json (`CountResult`), count.txt (the table) and count.png beside the sweep's run
folder files (saes/, metrics.json, config.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.data.toy import ToyDataConfig
from saelab.errors import ConfigError
from saelab.evals.entry import MetricsEntry
from saelab.evals.metrics import distinct_rows, max_cosine
from saelab.experiments.compare import directions
from saelab.experiments.saturation import GAIN, Saturation, estimate_count
from saelab.pipelines.toy import ToySweepConfig, run_toy_sweep
from saelab.pipelines.train_lm import LMSweepConfig, run_lm_sweep
from saelab.sae import SAE
from saelab.sae.architectures import architecture
from saelab.train.spec import TrainSpec
from saelab.train.sweep import SweepGrid, sweep_specs

ESTIMATOR = (f"N = m(w*), the distinct features of width w* matched in the next width, w* the first width whose "
             f"next doubling adds under {GAIN:.0%} new matched features (below N counts grew 67-182% per doubling "
             f"on toy data, past N 6-29%: a fitted plateau overshoots by that creep, 3-45%)")


# Each data kind's sparsity where none is given. Toy: the toy sweep's middle L1 and its true L0.
# A model's activations (normalised to mean norm sqrt(d_in)): L1 3 gave L0 10-22 and FVU 0.20-0.27
# at 1x-4x on the default LM's residual stream (L1 1: L0 27-58; L1 10: FVU 0.65-0.75, clumped).
TOY_KNOBS = {"coefficient": [0.3], "k": [5]}
LM_KNOBS = {"coefficient": [3.0], "k": [16]}


@dataclass
class CountConfig:
    """The width sweep (multiples of d_in, growing) at each knob value of one architecture, and
    the cosine above which a feature counts as found in the next width. `coefficient` / `k`
    None: the data kind's own (TOY_KNOBS, LM_KNOBS)."""

    widths: list[float] = field(default_factory=lambda: [1, 2, 4, 8])
    arch: str = "relu"
    coefficient: list[float] | None = None  # architectures without k
    k: list[int] | None = None  # k architectures
    threshold: float = 0.9
    steps: int = 1500
    lr: float | None = None  # None: the pipeline's (toy 5e-3; the LM sweep's 1e-3)
    seed: int = 0

    def __post_init__(self) -> None:
        w = list(self.widths)
        if len(w) < 3:
            raise ConfigError(f"--widths needs at least three widths (two width-to-next counts to compare); got {w}")
        if any(b <= a for a, b in zip(w, w[1:])) or w[0] <= 0:
            raise ConfigError(f"--widths must grow, each wider than the one before; got {' '.join(f'{x:g}' for x in w)}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"the threshold is a cosine in (0, 1), got {self.threshold}")
        architecture(self.arch)  # an unknown name is an error listing the registered ones

    def knobs(self, toy: bool) -> dict[str, list]:
        """{"coefficient": [...], "k": [...]}: the values given, else the data kind's."""
        own = TOY_KNOBS if toy else LM_KNOBS
        return {name: list(own[name] if getattr(self, name) is None else getattr(self, name)) for name in own}


@dataclass
class WidthCount:
    """One dictionary of the sweep: how many of its features the next width has (None for the
    widest), its reconstruction, and on toy data its ground-truth recovery."""

    width: int
    next_width: int | None
    mmcs_next: float | None  # mean over its alive directions of the best cosine among the next's alive ones
    alive: int  # latents that fired on the held-out data (the only ones counted)
    distinct: int  # alive directions not duplicating an earlier one above the threshold
    matched: int | None  # distinct directions found in the next width above the threshold
    mmcs_widest: float | None  # MMCS against the widest dictionary (the LM's stand-in for the truth)
    l0: float
    fvu: float
    dead: int
    truth_mmcs: float | None = None  # toy: MMCS against the true features
    truth_recovered: int | None = None  # toy: true features recovered above 0.9


@dataclass
class KnobCount:
    """The width sweep at one knob value (`knob`: "c0.3", "k5"; `value`: 0.3, 5) and its estimate."""

    knob: str
    value: float
    widths: list[WidthCount]
    estimate: Saturation


@dataclass
class CountResult:
    source: str  # "toy: d=64, 256 true features" or "<model> <hook>"
    d_in: int
    arch: str
    threshold: float
    truth: int | None  # toy: the number of true features
    counts: list[KnobCount]
    config: dict
    run_dir: Path
    estimator: str = ESTIMATOR

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir)
        for count, knob in zip(out["counts"], self.counts):
            count["estimate"] = knob.estimate.to_dict()
        return out


def run_count_toy(cfg: CountConfig, data: ToyDataConfig, run_dir: str | Path) -> CountResult:
    """The count on toy data with `data.n_features` true features (resuming what is there)."""
    run_dir = Path(run_dir)
    widths = [int(round(w * data.d)) for w in cfg.widths]
    if len(set(widths)) < len(widths):
        raise ConfigError(f"--widths {cfg.widths} round to repeated widths {widths} at d={data.d}")
    toy = ToySweepConfig(data=data, width=widths, arch=[cfg.arch], **cfg.knobs(toy=True), steps=cfg.steps,
                         seed=cfg.seed, **({"lr": cfg.lr} if cfg.lr else {}))
    rows = run_toy_sweep(toy, run_dir)
    source = f"toy: d={data.d}, {data.n_features} true features, {data.mean_active:g} active on average"
    return count_features(cfg, rows, run_dir, source, truth=data.n_features)


def run_count_lm(cfg: CountConfig, sweep: LMSweepConfig, run_dir: str | Path, lm=None) -> CountResult:
    """The count on a language model's activations: `sweep` says where (model, hook, text,
    contexts, batch size); its specs are replaced by the width sweep. Resumes what is there."""
    run_dir = Path(run_dir)
    grid = SweepGrid(arch=[cfg.arch], expansion=list(cfg.widths), d_sae=[], **cfg.knobs(toy=False))
    specs = sweep_specs(grid, cfg.steps, **({"lr": cfg.lr} if cfg.lr else {}))
    rows = run_lm_sweep(dataclasses.replace(sweep, specs=specs, steps=cfg.steps, seed=cfg.seed), run_dir, lm)
    first = SAE.load(run_dir / "saes" / rows[0].name)
    source = f"{Path(first.cfg.model_name or 'default').name} {first.cfg.hook_name}"
    return count_features(cfg, rows, run_dir, source)


def count_features(cfg: CountConfig, rows: list[MetricsEntry], run_dir: Path, source: str,
                   truth: int | None = None) -> CountResult:
    """Match each width in the next, per knob, estimate N from the counts, and write count.json."""
    groups: dict[str, list[MetricsEntry]] = {}
    for row in rows:
        groups.setdefault(TrainSpec.from_dict(row.spec).knob(), []).append(row)
    counts = [_knob_count(cfg, knob, sorted(members, key=lambda r: r.recon.d_sae), run_dir, truth)
              for knob, members in groups.items()]
    d_in = SAE.load(run_dir / "saes" / rows[0].name).cfg.d_in
    result = CountResult(source, d_in, cfg.arch, cfg.threshold, truth, counts, dataclasses.asdict(cfg), run_dir)
    write_json(run_dir / "count.json", result.to_dict())
    return result


def _knob_count(cfg: CountConfig, knob: str, rows: list[MetricsEntry], run_dir: Path, truth: int | None) -> KnobCount:
    """One knob's widths: each one's alive directions matched in the next's, and the estimate."""
    dirs = [_alive_directions(row, run_dir) for row in rows]
    widths = []
    for i, (row, here) in enumerate(zip(rows, dirs)):
        nxt = dirs[i + 1] if i + 1 < len(dirs) else None
        distinct = distinct_rows(here, cfg.threshold) if len(here) else torch.zeros(0, dtype=torch.bool)
        best = _best(nxt, here)
        values = row.to_dict()  # toy rows carry ground-truth recovery: mmcs, recovered (a share)
        widths.append(WidthCount(
            width=row.recon.d_sae, next_width=None if nxt is None else rows[i + 1].recon.d_sae,
            mmcs_next=None if best is None else _mean(best), alive=len(here), distinct=int(distinct.sum()),
            matched=None if best is None else int(((best > cfg.threshold) & distinct).sum()),
            mmcs_widest=None if nxt is None else _mean(_best(dirs[-1], here)),
            l0=row.recon.l0, fvu=row.recon.fvu, dead=row.recon.dead, truth_mmcs=values.get("mmcs"),
            truth_recovered=None if truth is None else int(round(values["recovered"] * truth))))
    spec = TrainSpec.from_dict(rows[0].spec)
    estimate = estimate_count([w.width for w in widths[:-1]], [w.matched for w in widths[:-1]])
    return KnobCount(knob, float(spec.k if spec.k is not None else spec.coefficient), widths, estimate)


def _alive_directions(row: MetricsEntry, run_dir: Path) -> torch.Tensor:
    """The decoder directions of the row's SAE that fired on the held-out data: a dead latent
    is no feature of the data (and SAEs that died early share directions, which would match)."""
    dirs = directions(SAE.load(run_dir / "saes" / row.name))
    density = row.recon.density
    return dirs if density is None else dirs[density.to(dirs.device) > 0]


def _best(learned: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor | None:
    """Each reference direction's best cosine among `learned` (None without a next width; 0
    when one side has no alive direction)."""
    if learned is None:
        return None
    if len(learned) == 0 or len(reference) == 0:
        return torch.zeros(len(reference))
    return max_cosine(learned, reference)


def _mean(values: torch.Tensor) -> float | None:
    return values.mean().item() if len(values) else None


__all__ = ["CountConfig", "CountResult", "KnobCount", "WidthCount", "count_features", "run_count_lm", "run_count_toy"]
