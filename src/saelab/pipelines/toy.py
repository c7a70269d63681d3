"""Ground-truth recovery on toy data (the interim report in the seeds): train a sweep of SAEs on
synthetic activations whose true features are known, and measure how many they recover (MMCS).

One pass over the data trains the whole sweep (GroupTrainer); the result table has, per SAE,
its knob (L1 coefficient or k), L0, FVU, MMCS against the ground truth, the fraction of true
features recovered above 0.9 cosine, and dead features. Everything lands in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.data.toy import ToyDataConfig, ToyDataSource
from saelab.evals.metrics import max_cosine, mmcs
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.spec import TrainSpec


@dataclass
class ToySweepConfig:
    data: ToyDataConfig = field(default_factory=lambda: ToyDataConfig(d=64, n_features=256, mean_active=5, batch_size=1024))
    width: int = 256
    l1: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.6])
    k: list[int] = field(default_factory=lambda: [5])
    arch_k: str = "topk"
    decoder_norm: str = "weighted"
    steps: int = 1500
    lr: float = 5e-3
    eval_batches: int = 4
    seed: int = 0

    def specs(self) -> list[TrainSpec]:
        """relu at each L1 coefficient (weighted by decoder norms, the coefficient warmed up over
        the first tenth), and topk at each k with a strong auxiliary loss: on toy data dead
        latents are the main thing between a topk SAE and full recovery."""
        common = dict(d_sae=self.width, lr=self.lr, warmup_steps=50)
        relu = [
            TrainSpec(arch="relu", coefficient=c, decoder_norm=self.decoder_norm, coefficient_warmup_steps=self.steps // 10, **common)
            for c in self.l1
        ]
        topk = [TrainSpec(arch=self.arch_k, k=k, dead_tokens=50_000, aux_coefficient=0.25, **common) for k in self.k]
        return relu + topk


def run_toy_sweep(cfg: ToySweepConfig, run_dir: str | Path) -> list[dict]:
    """Train the sweep, then add ground-truth recovery to each SAE's metrics.json entry."""
    run_dir = Path(run_dir)
    source = ToyDataSource(cfg.data)
    held_out = [source.batch(10_000_000 + i) for i in range(cfg.eval_batches)]
    trainer = GroupTrainer(cfg.specs(), cfg.data.d, run_dir, TrainConfig(total_steps=cfg.steps, checkpoint_every=500, log_every=50, seed=cfg.seed))
    trainer.fit(source)
    entries = trainer.write_metrics(held_out)
    local = {label: ground_truth_recovery(sae, source.features) for label, sae in zip(trainer.labels, trainer.final_saes())}
    recovery = trainer.gather(local)
    for entry in entries:
        entry.update(recovery[entry["name"]])
    if trainer.rank == 0:
        write_json(run_dir / "metrics.json", entries)
        write_json(run_dir / "toy_data.json", cfg.data.to_dict())
    return entries


@torch.no_grad()
def ground_truth_recovery(sae: SAE, true_features: torch.Tensor, threshold: float = 0.9) -> dict:
    """MMCS of the decoder against the true features, and the share recovered above `threshold`."""
    best = max_cosine(sae.W_dec.detach().float(), true_features.float())
    return {"mmcs": float(mmcs(sae.W_dec.detach().float(), true_features.float())), "recovered": float((best > threshold).float().mean())}


def format_table(entries: list[dict]) -> str:
    head = f"{'sae':<24}{'knob':>8}{'L0':>8}{'FVU':>8}{'MMCS':>8}{'>0.9':>7}{'dead':>6}"
    rows = [head, "-" * len(head)]
    for e in entries:
        spec = e["spec"]
        knob = f"k={spec['k']}" if spec.get("k") is not None else f"{spec['coefficient']:g}"
        rows.append(
            f"{e['name']:<24}{knob:>8}{e['l0']:>8.2f}{e['fvu']:>8.3f}{e['mmcs']:>8.3f}{e['recovered']:>7.2f}{e['dead']:>6d}"
        )
    return "\n".join(rows)
