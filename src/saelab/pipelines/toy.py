"""Ground-truth recovery on toy data (the interim report in the seeds): train a sweep of SAEs on
synthetic activations whose true features are known, and measure how many they recover (MMCS).
The job behind `saelab toy`.

One pass over the data trains the whole sweep (GroupTrainer); the result table has, per SAE,
its knob (L1 coefficient or k), L0, FVU, MMCS against the ground truth, the fraction of true
features recovered above 0.9 cosine, and dead features. Everything lands in the run folder:
config.json (with this sweep's settings, the toy data's included, under "pipeline"), the log,
saes/ and metrics.json (one row per SAE, with `mmcs` and `recovered`).

Seed 001's data-sample initialisation: `init` lists decoder inits ("tied", "data"); with more
than the default, every SAE of the sweep is trained once per init (labels end in `_<init>`),
and `curve_every` > 0 records each SAE's recovery every that many steps from its initial state
(`saelab.pipelines.recovery_curve`: recovery_curve.json and .png). `width` may be a list: a
width sweep, as `saelab count` trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.data.toy import ToyDataConfig, ToyDataSource
from saelab.evals.entry import MetricsEntry, write_metrics
from saelab.evals.metrics import max_cosine, mmcs
from saelab.evals.reconstruction import evaluate_saes
from saelab.pipelines.recovery_curve import CURVE_FILE, RecoveryCurve, plot_recovery_curves
from saelab.sae import SAE
from saelab.tables import Column, format_rows
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.shard import TrainedSAE
from saelab.train.spec import TrainSpec
from saelab.train.sweep import SweepGrid, per_init, sweep_specs


# on toy data dead latents are the main thing between an aux-k SAE and full recovery: they
# count as dead sooner and their auxiliary loss weighs more than on a real model
TOY_DEFAULTS = {"warmup_steps": 50, "dead_tokens": 50_000, "aux_coefficient": 0.25}


@dataclass
class ToySweepConfig:
    """The toy data and the sweep: every architecture in `arch` at width `width`, at each of its
    `coefficient` values (penalty architectures) or `k` values (k architectures)."""

    data: ToyDataConfig = field(default_factory=lambda: ToyDataConfig(d=64, n_features=256, mean_active=5, batch_size=1024))
    width: int | list[int] = 256
    arch: list[str] = field(default_factory=lambda: ["relu", "topk"])
    coefficient: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.6])
    k: list[int] = field(default_factory=lambda: [5])
    steps: int = 1500
    lr: float = 5e-3
    eval_batches: int = 4
    seed: int = 0
    init: list[str] = field(default_factory=lambda: ["tied"])  # decoder inits: each SAE once per init
    curve_every: int = 0  # > 0: recovery against the ground truth every that many steps

    def specs(self) -> list[TrainSpec]:
        """The grid through `saelab.train.sweep` (the one sweep builder), with TOY_DEFAULTS
        where an architecture reads them (coefficients warm up over the first tenth); once per
        init, labelled `<label>_<init>`, unless the init is only the default ("tied")."""
        widths = [self.width] if isinstance(self.width, int) else list(self.width)
        grid = SweepGrid(arch=list(self.arch), expansion=[], d_sae=widths,
                         coefficient=list(self.coefficient), k=list(self.k))
        return per_init(sweep_specs(grid, self.steps, defaults=TOY_DEFAULTS, lr=self.lr), self.init, self.data.d)


@dataclass
class Recovery:
    """Ground-truth recovery of a dictionary: MMCS of its decoder rows against the true
    features, and the share of true features matched above the cosine threshold."""

    mmcs: float
    recovered: float

    def to_dict(self) -> dict:
        return {"mmcs": self.mmcs, "recovered": self.recovered}


def run_toy_sweep(cfg: ToySweepConfig, run_dir: str | Path) -> list[MetricsEntry]:
    """Train the sweep into `run_dir` (resuming what is there) and evaluate it on held-out toy
    batches; returns each SAE's metrics row (with ground-truth recovery), in spec order."""
    run_dir = Path(run_dir)
    source = ToyDataSource(cfg.data)
    held_out = [source.batch(10_000_000 + i) for i in range(cfg.eval_batches)]
    tcfg = TrainConfig(total_steps=cfg.steps, checkpoint_every=500, log_every=50, seed=cfg.seed)
    trainer = GroupTrainer(cfg.specs(), cfg.data.d, run_dir, tcfg, pipeline=asdict(cfg))
    curve = None
    if cfg.curve_every:
        curve = RecoveryCurve(trainer, lambda sae: ground_truth_recovery(sae, source.features), cfg.curve_every,
                              run_dir / CURVE_FILE).attach()
    result = trainer.fit(source)
    if curve is not None and result.writes:
        plot_recovery_curves(curve.to_dict(), run_dir / "recovery_curve.png",
                             title=f"toy d={cfg.data.d}, {cfg.data.n_features} true features: MMCS during training")

    def rows(mine: list[TrainedSAE]) -> list[MetricsEntry]:
        recon = evaluate_saes([t.sae for t in mine], held_out)
        return [MetricsEntry(t.label, m, spec=t.spec.to_dict(), extra=[ground_truth_recovery(t.sae, source.features)])
                for t, m in zip(mine, recon)]
    entries = result.collect(rows)
    if result.writes:
        write_metrics(run_dir, entries)
    return entries


@torch.no_grad()
def ground_truth_recovery(sae: SAE, true_features: torch.Tensor, threshold: float = 0.9) -> Recovery:
    """MMCS of the decoder against the true features, and the share recovered above `threshold`."""
    learned, true_features = sae.W_dec.detach().float(), true_features.to(sae.W_dec.device).float()
    best = max_cosine(learned, true_features)
    return Recovery(float(mmcs(learned, true_features)),
                    float((best > threshold).float().mean()))


def _knob(row: MetricsEntry) -> str:
    spec = row.spec
    return f"k={spec['k']}" if spec.get("k") is not None else f"{spec['coefficient']:g}"


TABLE = (Column("name", "sae"), Column("knob"), Column("l0", "L0", ".2f"), Column("fvu", "FVU", ".3f"),
         Column("mmcs", "MMCS", ".3f"), Column("recovered", ">0.9", ".2f"), Column("dead"))


def format_table(rows: list[MetricsEntry]) -> str:
    """The recovery table: per SAE its knob (L1 coefficient or k), L0, FVU, MMCS, share of
    true features recovered above 0.9 cosine, and dead features."""
    return format_rows([{**row.to_dict(), "knob": _knob(row)} for row in rows], TABLE)
