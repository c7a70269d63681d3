"""Train a group of SAEs on one activation stream: every SAE sees every batch, once.

An L1 x width sweep is one pass over the data, not N passes. The run folder holds:

    config.json                 the run (TrainConfig, specs, d_in/d_out, hooks)
    log.jsonl                   one JSON line per logging step: each SAE's loss parts, L0, FVU, dead
    checkpoint.safetensors      everything needed to resume exactly (weights, Adam, dead counters, RNG)
    saes/<label>/               each trained SAE, in the SAELens-compatible folder format
    metrics.json                one entry per SAE, from the evaluation batches

A batch source is an iterable of `x` tensors (N, d_in) or `(x, y)` pairs (transcoders). If it has
`iter_from(step)`, a resumed run continues from the right batch directly; otherwise the batches
already used are skipped. With the same seed, a run resumed after a crash or `kill -9` ends
with the same weights as one that never stopped.

Scaling out: under `torch.distributed` (e.g. `torchrun`, any backend), each rank trains every
world-th SAE of the sweep on the same batch stream and keeps its own checkpoint file; rank 0
gathers the log lines and metrics. Each SAE has its own seeded generator and is initialised the
same way whatever the rank count, so a sharded sweep ends with exactly the weights of a
single-process one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from saelab.atomic import save_tensors, write_json, write_text
from saelab.errors import ConfigError, CorruptFileError, DataError
from saelab.evals.reconstruction import evaluate_saes
from saelab.sae.model import SAE
from saelab.train.trainer import SAETrainer
from saelab.train.spec import TrainSpec

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    total_steps: int = 1000
    checkpoint_every: int = 200
    log_every: int = 10
    normalize_activations: bool = False  # scale inputs to mean norm sqrt(d); folded back on save
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.total_steps <= 0 or self.checkpoint_every <= 0 or self.log_every <= 0:
            raise ConfigError("total_steps, checkpoint_every and log_every must be positive integers")


def _as_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DataError(f"a batch must be x or (x, y); got a sequence of {len(batch)}")
        return batch[0], batch[1]
    return batch, batch


def _batches_from(source: Iterable, step: int) -> Iterator:
    if hasattr(source, "iter_from"):
        return iter(source.iter_from(step))
    it = iter(source)
    for _ in range(step):
        next(it)
    return it


class GroupTrainer:
    """Trains `specs` (any mix of architectures, widths, coefficients, k) on one stream."""

    def __init__(
        self,
        specs: list[TrainSpec],
        d_in: int,
        run_dir: str | Path,
        config: TrainConfig | None = None,
        d_out: int | None = None,
        hook_name: str | None = None,
        hook_name_out: str | None = None,
        model_name: str | None = None,
        on_step: Callable[[int, list[dict | None]], None] | None = None,
    ):
        if not specs:
            raise ConfigError("give at least one TrainSpec")
        self.specs, self.d_in, self.d_out = list(specs), d_in, d_out or d_in
        self.config = config or TrainConfig()
        self.run_dir = Path(run_dir)
        self.where = dict(hook_name=hook_name, hook_name_out=hook_name_out, model_name=model_name)
        self.labels = [s.label(d_in) for s in self.specs]
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"two specs share a label: {self.labels}; give them distinct `name`s")
        self.on_step = on_step
        self.all_labels, self.all_specs = self.labels, self.specs
        self.rank, self.world = rank_and_world()
        if self.world > len(self.specs):
            raise ConfigError(f"{self.world} ranks but only {len(self.specs)} SAEs: every rank needs at least one")
        torch.manual_seed(self.config.seed)
        saes = [SAE.from_config(s.sae_config(d_in, self.d_out, **self.where)) for s in self.specs]  # all: same init on any rank
        mine = range(self.rank, len(self.specs), self.world)
        self.specs, self.labels = [self.specs[i] for i in mine], [self.labels[i] for i in mine]
        self.trainers = [
            SAETrainer(self.all_specs[i], saes[i].to(self.config.device), self.config.total_steps,
                       torch.Generator().manual_seed(self.config.seed * 1_000_003 + i))
            for i in mine
        ]
        self.scale_in = self.scale_out = 1.0
        self.step = 0

    @property
    def saes(self) -> list[SAE]:
        return [t.sae for t in self.trainers]

    def run_config(self) -> dict:
        return {
            "train": dataclasses.asdict(self.config),
            "specs": [s.to_dict() for s in self.all_specs],
            "d_in": self.d_in,
            "d_out": self.d_out,
            **self.where,
        }

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, source: Iterable, eval_batches: Iterable | None = None) -> list[Path]:
        """Train (resuming from the run folder's checkpoint if there is one), save, evaluate."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_or_write_config()
        if not self._load_checkpoint():
            self._initialise(source)
        self._truncate_log()
        cfg = self.config
        batches = _batches_from(source, self.step)
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="training", unit="step", disable=None if self.rank == 0 else True)
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") if self.rank == 0 else _NoFile() as log:
            while self.step < cfg.total_steps:
                try:
                    x, y = self._prepare(next(batches))
                except StopIteration:
                    raise DataError(f"the batch source ran out at step {self.step} of {cfg.total_steps}") from None
                logging = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.total_steps
                entries = [t.update(self.step, x, y, log=logging) for t in self.trainers]
                self.step += 1
                bar.update(1)
                if logging:
                    merged = self.gather(dict(zip(self.labels, entries)))
                    merged = {label: merged[label] for label in self.all_labels}
                    record = {"step": self.step, "tokens": self.step * x.shape[0], "saes": merged}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    first = merged[self.all_labels[0]]
                    bar.set_postfix(l0=f"{first['l0']:.1f}", fvu=f"{first['fvu']:.3f}")
                if self.on_step is not None:
                    self.on_step(self.step, entries)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps:
                    self.save_checkpoint()
        bar.close()
        paths = self.save_saes()
        if eval_batches is not None:
            self.write_metrics(eval_batches)
        return paths

    def _prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _as_pair(batch)
        same = y is x
        x = x.to(self.config.device, torch.float32)
        y = x if same else y.to(self.config.device, torch.float32)
        if x.dim() != 2 or x.shape[-1] != self.d_in or y.shape != (x.shape[0], self.d_out):
            raise DataError(f"batch shapes {tuple(x.shape)} -> {tuple(y.shape)}; expected (N, {self.d_in}) -> (N, {self.d_out})")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise DataError(f"batch at step {self.step} contains NaN or Inf activations")
        if same:
            x = y = x * self.scale_in
        else:
            x, y = x * self.scale_in, y * self.scale_out
        return x, y

    def _initialise(self, source: Iterable) -> None:
        """Scale factors and data-dependent init, from the first batch (deterministic)."""
        x, y = _as_pair(next(_batches_from(source, 0)))
        x, y = x.float().to(self.config.device), y.float().to(self.config.device)
        if self.config.normalize_activations:
            self.scale_in = math.sqrt(self.d_in) / float(x.norm(dim=-1).mean().clamp_min(1e-12))
            self.scale_out = math.sqrt(self.d_out) / float(y.norm(dim=-1).mean().clamp_min(1e-12))
            if y is x:
                self.scale_out = self.scale_in
        sample = x * self.scale_in
        for trainer in self.trainers:
            spec = trainer.spec
            trainer.sae.init_from_data(
                sample,
                b_dec=spec.b_dec_init,
                decoder=spec.init == "data",
                generator=trainer.generator,
            )

    # ---- outputs ---------------------------------------------------------------------------
    def final_saes(self) -> list[SAE]:
        """Copies of the SAEs with the input scaling folded in: they work on raw activations."""
        out = []
        for trainer, label in zip(self.trainers, self.labels):
            sae = copy.deepcopy(trainer.sae).cpu().eval()
            sae.fold_scaling(self.scale_in, self.scale_out)
            sae.cfg.metadata = {**sae.cfg.metadata, "train": trainer.spec.to_dict(), "label": label}
            out.append(sae)
        return out

    def save_saes(self) -> list[Path]:
        return [sae.save(self.run_dir / "saes" / label) for sae, label in zip(self.final_saes(), self.labels)]

    def write_metrics(self, eval_batches: Iterable) -> list[dict]:
        """Evaluate this rank's SAEs; metrics.json (written by rank 0) has every SAE, in spec order."""
        entries = evaluate_saes(self.final_saes(), eval_batches)
        for entry, label, spec in zip(entries, self.labels, self.specs):
            entry.update({"name": label, "spec": spec.to_dict()})
        merged = self.gather(dict(zip(self.labels, entries)))
        ordered = [merged[label] for label in self.all_labels]
        if self.rank == 0:
            write_json(self.run_dir / "metrics.json", ordered)
        return ordered

    def gather(self, mine: dict) -> dict:
        """Merge {label: value} dicts of every rank (a collective: all ranks call it together)."""
        if self.world == 1:
            return mine
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        name = CHECKPOINT if self.world == 1 else CHECKPOINT.replace(".", f".rank{self.rank}of{self.world}.", 1)
        return self.run_dir / name

    def save_checkpoint(self) -> Path:
        tensors = {}
        for i, trainer in enumerate(self.trainers):
            tensors.update({f"{i}.{k}": v for k, v in trainer.state_tensors().items()})
            tensors[f"{i}.rng"] = trainer.generator.get_state()
        meta = {"step": str(self.step), "scale_in": repr(self.scale_in), "scale_out": repr(self.scale_out)}
        return save_tensors(self.checkpoint_path, tensors, metadata=meta)

    def _load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if not path.exists():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata()
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptFileError(f"checkpoint {path} cannot be read ({err}); delete it to start the run afresh") from err
        self.step = int(meta["step"])
        self.scale_in, self.scale_out = float(meta["scale_in"]), float(meta["scale_out"])
        for i, trainer in enumerate(self.trainers):
            trainer.generator.set_state(tensors.pop(f"{i}.rng"))
            prefix = f"{i}."
            trainer.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return True

    def _check_or_write_config(self) -> None:
        path, wanted = self.run_dir / "config.json", self.run_config()
        if path.exists() and self.checkpoint_path.exists():
            found = json.loads(path.read_text())
            if found != json.loads(json.dumps(wanted)):
                raise ConfigError(f"{self.run_dir} holds a checkpoint of a different run; use a new run folder or the same config")
        elif self.rank == 0:
            write_json(path, wanted)

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint: they will be written again by the resumed run."""
        path = self.run_dir / "log.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        write_text(path, "".join(line + "\n" for line in keep))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _NoFile:
    """Stands in for the log file on ranks other than 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def train_group(specs: list[TrainSpec], source: Iterable, d_in: int, run_dir: str | Path, **kwargs) -> list[Path]:
    """One call: train every spec on `source` into `run_dir` (see GroupTrainer for options)."""
    eval_batches = kwargs.pop("eval_batches", None)
    return GroupTrainer(specs, d_in, run_dir, **kwargs).fit(source, eval_batches)
