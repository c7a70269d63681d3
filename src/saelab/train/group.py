"""Train a group of SAEs on one activation stream: every SAE sees every batch, once.

An L1 x width sweep is one pass over the data, not N passes. The trainer writes into the run
folder:

    config.json                 the run: TrainConfig, specs, d_in/d_out, hooks, and the settings
                                of the pipeline driving it (`pipeline`); a resume must match it
    log.jsonl                   one JSON line per logging step: each SAE's loss parts, L0, FVU, dead
    checkpoint.safetensors      everything needed to resume exactly (weights, Adam, dead counters, RNG)
    saes/<label>/               each trained SAE, in the SAELens-compatible folder format

and `fit` returns a `TrainResult` (saelab.train.shard) with the final SAEs, from which the
pipeline makes the metrics.json rows (saelab.evals.entry) and writes them.

A batch source is an iterable of `x` tensors (N, d_in) or `(x, y)` pairs (transcoders). If it has
`iter_from(step)`, a resumed run continues from the right batch directly; otherwise the batches
already used are skipped. With the same seed, a run resumed after a crash or `kill -9` ends
with the same weights as one that never stopped.

With `TrainConfig.outlier_multiple` set, every batch loses the rows that `OutlierRule` flags
(judged on the input x, each batch on its own) before any SAE or the activation scaling sees
it, the first batch's data initialisation included; whatever the source (disk cache, live LM,
rows in memory). The log counts the rows trained on (`tokens`) and dropped (`outliers_dropped`);
each SAE records the rule in its provenance (saelab.data.provenance).

Scaling out: under `torch.distributed` (e.g. `torchrun`, any backend), each rank trains its
share of the sweep (saelab.train.shard) on the same batch stream and keeps its own checkpoint
file; rank 0 writes config.json and the log lines of all ranks. Each SAE has its own seeded
generator and is initialised the same way whatever the rank count, so a sharded sweep ends
with exactly the weights of a single-process one. With `parallel="data"` every rank trains every
SAE on its share of each batch instead (saelab.train.data_parallel: DDP, one checkpoint).
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

from saelab.atomic import save_tensors, write_json, write_text
from saelab.data.cache.shuffle import as_pair
from saelab.data.outliers import OutlierRule
from saelab.data.provenance import Provenance
from saelab.errors import ConfigError, CorruptFileError, DataError, Interrupted
from saelab.progress import progress_bar
from saelab.sae.config import PROVENANCE
from saelab.sae.model import SAE
from saelab.train.batched import Stepper
from saelab.train.data_parallel import make_shard
from saelab.train.shard import TrainedSAE, TrainResult, rank_and_world
from saelab.train.spec import TrainSpec

__all__ = ["GroupTrainer", "TrainConfig", "TrainResult", "rank_and_world"]

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    total_steps: int = 1000
    checkpoint_every: int = 200
    log_every: int = 10
    normalize_activations: bool = False  # scale inputs to mean norm sqrt(d); folded back on save
    seed: int = 0
    device: str = "cpu"
    outlier_multiple: float | None = None  # drop rows with norm > this x the batch's median (None: keep all)

    def __post_init__(self) -> None:
        if self.total_steps <= 0 or self.checkpoint_every <= 0 or self.log_every <= 0:
            raise ConfigError("total_steps, checkpoint_every and log_every must be positive integers")
        self.outlier_multiple = OutlierRule(self.outlier_multiple).multiple  # checked; 0 reads as None

    @property
    def outliers(self) -> OutlierRule:
        return OutlierRule(self.outlier_multiple)


def _batches_from(source: Iterable, step: int) -> Iterator:
    if hasattr(source, "iter_from"):
        return iter(source.iter_from(step))
    it = iter(source)
    for _ in range(step):
        next(it)
    return it


def _to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """t as float32 on `device`. A CPU batch bound for a GPU goes through pinned memory without
    blocking: the host then prepares the next batch while the GPU trains on this one."""
    t = t.float()
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class GroupTrainer:
    """Trains `specs` (any mix of architectures, widths, coefficients, k) on one stream.

    `specs` and `labels` are the whole sweep, in spec order; `trainers` (and `saes`) are this
    process's share of it (all of it without torch.distributed). `pipeline` is the settings of
    the job driving the trainer (JSON-able), recorded in config.json and checked on resume.
    `provenance` (the training text: source, context length, BOS) is saved in each SAE's
    metadata with the outlier rule applied. `parallel` ("sweep" or "data") says how ranks
    under torch.distributed split the work: whole SAEs, or the rows of every batch."""

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
        pipeline: dict | None = None,
        provenance: Provenance | None = None,
        on_start: Callable[[int], None] | None = None,
        parallel: str = "sweep",
    ):
        if not specs:
            raise ConfigError("give at least one TrainSpec")
        self.specs, self.d_in, self.d_out = list(specs), d_in, d_out or d_in
        self.config = config or TrainConfig()
        self.run_dir = Path(run_dir)
        self.where = dict(hook_name=hook_name, hook_name_out=hook_name_out, model_name=model_name)
        self.pipeline = pipeline
        self.provenance = dataclasses.replace(provenance or Provenance(), outliers=self.config.outliers)
        self.labels = [s.label(d_in) for s in self.specs]
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"two specs share a label: {self.labels}; give them distinct `name`s")
        self.on_step = on_step  # after every step: (steps done, this rank's log entries or Nones)
        self.on_start = on_start  # once per fit, before the first step: (the step it starts from)
        self.shard = make_shard(len(self.specs), parallel)  # under torch.distributed: whole SAEs or rows per rank
        torch.manual_seed(self.config.seed)
        saes = [SAE.from_config(s.sae_config(d_in, self.d_out, **self.where)) for s in self.specs]  # all: same init on any rank
        self.trainers = [
            self.shard.trainer(self.specs[i], saes[i].to(self.config.device), self.config.total_steps,
                               torch.Generator().manual_seed(self.config.seed * 1_000_003 + i))
            for i in self.shard.indices
        ]
        self.scale_in = self.scale_out = 1.0
        self.step = 0
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk
        self._stepper: Stepper | None = None  # during fit: same-shaped SAEs stacked (train.batched)
        self.rows_trained = self.rows_dropped = 0

    @property
    def saes(self) -> list[SAE]:
        """This process's SAEs as they train (on scaled inputs); `fit` returns the final ones."""
        if self._stepper is not None:
            self._stepper.push()
        return [t.sae for t in self.trainers]

    def run_config(self) -> dict:
        """What config.json holds (and a resumed run must match)."""
        return {
            "train": dataclasses.asdict(self.config),
            "specs": [s.to_dict() for s in self.specs],
            "d_in": self.d_in,
            "d_out": self.d_out,
            **self.where,
            **({} if self.pipeline is None else {"pipeline": self.pipeline}),
        }

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, source: Iterable) -> TrainResult:
        """Train (resuming from the run folder's checkpoint if there is one) and save the SAEs;
        returns this process's final SAEs (see TrainResult for evaluating them)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_or_write_config()
        try:
            return self._fit(source)
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted_message()) from None

    def _fit(self, source: Iterable) -> TrainResult:
        if not self._load_checkpoint():
            self._initialise(source)
        self.shard.check_start(self.step)
        self._truncate_log()
        if self.on_start is not None:  # the SAEs as initialised (or resumed), e.g. to measure them
            self.on_start(self.step)
        self._stepper = Stepper(self.trainers)
        cfg, writes = self.config, self.shard.writes
        batches = _batches_from(source, self.step)
        bar = progress_bar(total=cfg.total_steps, initial=self.step, desc="training", unit="step",
                           enabled=None if writes else False)
        try:
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") if writes else _NoFile() as log:
                while self.step < cfg.total_steps:
                    try:
                        x, y = self._prepare(*self.shard.rows(*self._drop_outliers(next(batches), count=True)))
                    except StopIteration:
                        raise DataError(f"the batch source ran out at step {self.step} of {cfg.total_steps}") from None
                    logging = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.total_steps
                    entries = self._stepper.update(self.step, x, y, logging)
                    self.step += 1
                    bar.update(1)
                    if logging or self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps:
                        self.stop_if_nonfinite()
                    if logging:
                        self._log(log, bar, entries)
                    if self.on_step is not None:
                        self.on_step(self.step, entries)
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps:
                        self.save_checkpoint()
        finally:  # a Ctrl-C leaves the terminal on a fresh line
            bar.close()
        self._stepper.push()
        self._stepper = None
        return TrainResult(self.run_dir, self._final_saes(), self.shard, self.rows_trained, self.rows_dropped)

    def stop_if_nonfinite(self) -> None:
        """Raise, on every rank, if any SAE's loss went NaN or Inf: before that step's log line,
        checkpoint or saved SAEs are written (a collective: checked on logging and checkpoint
        steps, which every rank reaches together; a callback that writes what it measures
        calls it first)."""
        steps = self.shard.gather([t.nonfinite_step() for t in self.trainers])
        bad = [(step, label) for step, label in zip(steps, self.labels) if step is not None]
        if not bad:
            return
        step, label = min(bad, key=lambda b: b[0])  # the earliest; in spec order among equals
        spec = self.specs[self.labels.index(label)]
        others = f" ({len(bad) - 1} other SAE(s) too)" if len(bad) > 1 else ""
        raise DataError(
            f"training stopped: SAE {label} ({spec.arch}, width {spec.width(self.d_in)}, lr {spec.lr:g}) had a NaN or "
            f"Inf loss at step {step}{others}; nothing past the last good checkpoint was written: "
            f"{self._last_checkpoint()}. Lower its lr (or normalise the activations) in a new run folder")

    def _interrupted_message(self) -> str:
        """Where a run stopped by Ctrl-C stands: the last checkpoint, and how to go on from it."""
        stopped = f"training stopped at step {self.step} of {self.config.total_steps}"
        if self.checkpoint_step is None:
            return (f"{stopped}, before its first checkpoint (one every {self.config.checkpoint_every} steps); "
                    "rerunning the same command starts it again")
        return (f"{stopped}; the last checkpoint, {self.checkpoint_path}, holds step {self.checkpoint_step}: "
                "rerunning the same command (same run folder and settings) resumes from it")

    def _last_checkpoint(self) -> str:
        path = self.checkpoint_path
        if self.checkpoint_step is None:
            return f"none yet (one every {self.config.checkpoint_every} steps)"
        return f"{path} (step {self.checkpoint_step})"

    def _log(self, log, bar, entries: list[dict | None]) -> None:
        """One log.jsonl line with every rank's entries, in spec order (a collective)."""
        merged = dict(zip(self.labels, self.shard.gather(entries)))
        record = {"step": self.step, "tokens": self.rows_trained, "saes": merged}
        if self.config.outliers.enabled:
            record["outliers_dropped"] = self.rows_dropped
        log.write(json.dumps(record) + "\n")
        log.flush()
        first = merged[self.labels[0]]
        bar.set_postfix(tokens=record["tokens"], sae=self.labels[0], loss=f"{first['loss']:.4g}",
                        l0=f"{first['l0']:.1f}", fvu=f"{first['fvu']:.3f}")

    def _drop_outliers(self, batch, count: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) without the rows the outlier rule flags in x (an autoencoder's y stays x);
        `count` adds the batch to the run's tallies of rows trained on and dropped."""
        x, y = as_pair(batch)
        rule = self.config.outliers
        if rule.enabled and x.dim() == 2:
            keep = ~rule.mask(x)
            dropped = keep.numel() - int(keep.sum())
            if dropped:
                same = y is x
                x = x[keep]
                y = x if same else y[keep.to(y.device)]
            if count:
                self.rows_dropped += dropped
        if count:
            self.rows_trained += x.shape[0]
        return x, y

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        same = y is x
        if x.dim() != 2 or x.shape[-1] != self.d_in or y.shape != (x.shape[0], self.d_out):
            raise DataError(f"batch shapes {tuple(x.shape)} -> {tuple(y.shape)}; expected (N, {self.d_in}) -> (N, {self.d_out})")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):  # where the batch is: no GPU sync
            raise DataError(f"batch at step {self.step} contains NaN or Inf activations")
        x = _to_device(x, self.config.device)
        y = x if same else _to_device(y, self.config.device)
        if same:
            x = y = x * self.scale_in
        else:
            x, y = x * self.scale_in, y * self.scale_out
        return x, y

    def _initialise(self, source: Iterable) -> None:
        """Scale factors and data-dependent init, from the first batch (deterministic)."""
        x, y = self._drop_outliers(next(_batches_from(source, 0)))
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
    def _final_saes(self) -> list[TrainedSAE]:
        """This process's SAEs, copied with the input scaling folded in (they work on raw
        activations) and their label and spec in cfg.metadata, saved to saes/<label>/."""
        out = []
        for trainer, label in zip(self.trainers, self.shard.take(self.labels)):
            sae = copy.deepcopy(trainer.sae).cpu().eval()
            sae.fold_scaling(self.scale_in, self.scale_out)
            sae.cfg.metadata = {**sae.cfg.metadata, "train": trainer.spec.to_dict(), "label": label,
                                PROVENANCE: self.provenance.to_dict()}
            path = self.run_dir / "saes" / label
            out.append(TrainedSAE(label, trainer.spec, sae, sae.save(path) if self.shard.owns_files else path))
        return out

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / self.shard.checkpoint_name(CHECKPOINT)

    def save_checkpoint(self) -> Path:
        if self._stepper is not None:
            self._stepper.push()
        if not self.shard.owns_files:
            return self.checkpoint_path
        tensors = {}
        for i, trainer in enumerate(self.trainers):
            tensors.update({f"{i}.{k}": v for k, v in trainer.state_tensors().items()})
            tensors[f"{i}.rng"] = trainer.generator.get_state()
        meta = {"step": str(self.step), "scale_in": repr(self.scale_in), "scale_out": repr(self.scale_out),
                "rows_trained": str(self.rows_trained), "rows_dropped": str(self.rows_dropped)}
        path = save_tensors(self.checkpoint_path, tensors, metadata=meta)
        self.checkpoint_step = self.step
        return path

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
        self.step = self.checkpoint_step = int(meta["step"])
        self.scale_in, self.scale_out = float(meta["scale_in"]), float(meta["scale_out"])
        self.rows_trained, self.rows_dropped = int(meta.get("rows_trained", 0)), int(meta.get("rows_dropped", 0))
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
        elif self.shard.writes:
            write_json(path, wanted)

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint: they will be written again by the resumed run."""
        path = self.run_dir / "log.jsonl"
        if not self.shard.writes or not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        write_text(path, "".join(line + "\n" for line in keep))


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
