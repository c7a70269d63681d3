"""Sharding a sweep over processes, and what a group run hands back.

Under `torch.distributed` (e.g. `torchrun`, any backend) a sweep of n SAEs is split by rank:
rank r trains SAEs r, r + world, r + 2 world, ... (`Shard`). Per-SAE results (log entries,
metrics rows) come back together in spec order with `Shard.gather`, on every rank.

`TrainResult` is what `GroupTrainer.fit` returns: this process's final SAEs (built once, the
input scaling folded in, so they work on raw activations), each with its label, TrainSpec and
saved folder, and `collect(fn)`, which runs fn on this process's share (e.g. evaluation: each
rank evaluates its own SAEs) and returns the results of every rank in spec order. So no
pipeline needs to know about ranks: it collects its rows and, where `result.writes` (rank 0,
or the only process), writes the run folder's shared files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.train.spec import TrainSpec

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def once(fn: Callable[[], object], present: Callable[[], bool] | None = None) -> None:
    """Run fn() on rank 0 only (e.g. writing a shared activation cache); every rank returns
    once it has finished. A collective under torch.distributed; a plain call without it.

    `present()` says whether fn's output can be seen from this process: where it cannot (nodes
    that do not share rank 0's filesystem), the node's first process (LOCAL_RANK 0) runs fn
    too, so each node gets its own copy: one cache per node, or one on a shared filesystem."""
    rank, world = rank_and_world()
    if rank == 0:
        fn()
    if world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if present is not None:
        if rank != 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0 and not present():
            fn()
        dist.barrier()


def interleave(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Spec order from per-rank lists: element i is the (i // world)-th of rank i % world."""
    world = len(parts)
    if sum(len(p) for p in parts) != n:
        raise ConfigError(f"ranks returned {[len(p) for p in parts]} values for {n} SAEs; each SAE needs one")
    return [parts[i % world][i // world] for i in range(n)]


class Shard:
    """Which of a sweep's `n` SAEs this process owns, and the gather back into spec order."""

    def __init__(self, n: int, rank: int | None = None, world: int | None = None):
        found = rank_and_world()
        self.n = n
        self.rank = found[0] if rank is None else rank
        self.world = found[1] if world is None else world
        if self.world > n:
            raise ConfigError(f"{self.world} ranks but only {n} SAEs: every rank needs at least one")

    @property
    def indices(self) -> range:
        """Spec indices of this process's SAEs."""
        return range(self.rank, self.n, self.world)

    @property
    def writes(self) -> bool:
        """True on the one process that writes a run folder's shared files (rank 0)."""
        return self.rank == 0

    @property
    def owns_files(self) -> bool:
        """True where this process writes its SAEs' folders and its checkpoint (every rank
        here: each owns its SAEs)."""
        return True

    def checkpoint_name(self, name: str) -> str:
        """This rank's checkpoint file name: one per rank, with the rank count in it."""
        return name if self.world == 1 else name.replace(".", f".rank{self.rank}of{self.world}.", 1)

    def check_start(self, step: int) -> None:
        """Called once every rank has loaded its checkpoint (or none): each rank resumes its
        own SAEs, so any steps will do here."""

    def rows(self, x, y):
        """The rows of a batch this process trains on: all of them (data_parallel splits them)."""
        return x, y

    def trainer(self, spec: TrainSpec, sae: SAE, total_steps: int, generator):
        """The trainer of one of this process's SAEs."""
        from saelab.train.trainer import SAETrainer

        return SAETrainer(spec, sae, total_steps, generator)

    def collect(self, trained: Sequence, fn: Callable[[list], Sequence[T]]) -> list[T]:
        """fn(this process's trained SAEs), gathered from every rank in spec order."""
        return self.gather(one_each(fn, list(trained)))

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's share of a per-SAE list in spec order."""
        return [items[i] for i in self.indices]

    def gather(self, mine: Sequence[T]) -> list[T]:
        """Every rank's per-SAE values (one per owned SAE, in `indices` order) in spec order.
        A collective: every rank calls it at the same point."""
        if self.world == 1:
            return interleave([list(mine)], self.n)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(mine))
        return interleave(parts, self.n)


def one_each(fn: Callable[[list], Sequence[T]], items: list) -> list[T]:
    """fn(items), one value per item (no call for no items)."""
    values = list(fn(items)) if items else []
    if len(values) != len(items):
        raise ConfigError(f"collect's function returned {len(values)} values for {len(items)} SAEs")
    return values


@dataclass(frozen=True)
class TrainedSAE:
    """One final SAE of a run: `label` (its saes/<label>/ folder and metrics row name), the
    TrainSpec it was trained with, the SAE (on raw activations, eval mode, CPU) and its folder."""

    label: str
    spec: TrainSpec
    sae: SAE
    path: Path


@dataclass
class TrainResult:
    """What `GroupTrainer.fit` returns: this process's final SAEs in spec order, and `collect`."""

    run_dir: Path
    trained: list[TrainedSAE]
    shard: Shard
    rows_trained: int = 0  # activation rows the SAEs trained on (every SAE saw the same)
    rows_dropped: int = 0  # rows the outlier rule took out of the training batches

    @property
    def saes(self) -> list[SAE]:
        return [t.sae for t in self.trained]

    @property
    def writes(self) -> bool:
        """True on the process that writes the run folder's shared files (metrics.json, plots)."""
        return self.shard.writes

    def collect(self, fn: Callable[[list[TrainedSAE]], Sequence[T]]) -> list[T]:
        """fn(this process's trained SAEs) -> one value each (e.g. a metrics row); returns the
        values of every SAE of the sweep, in spec order, on every rank. A collective."""
        return self.shard.collect(self.trained, fn)
