"""Data-parallel training (DDP) of each SAE of a group: every rank holds every SAE, trains it
on its share of each global batch, and the ranks reduce what the batch decides.

The other way to scale out, sweep sharding (saelab.train.shard), gives each rank whole SAEs;
this one splits the rows. `GroupTrainer(..., parallel="data")` under `torch.distributed`
(`saelab train --parallel data` under torchrun) selects it. Every rank reads the same global
batch stream (the same seed, so the same batches as one process), drops the outlier rows from
the whole batch, and trains on its contiguous slice of what is left (`DataShard.rows`; shares
differ by at most one row). Per step, `DataParallelTrainer`:

    gradients      sum over ranks of (local mean-loss gradient x local rows) / global rows, one
                   flat all-reduce: the gradient of the loss averaged over the whole batch
    buffers        averaged (batchtopk's threshold), so every rank keeps the same SAE
    fired          OR over ranks; "tokens since a feature fired" counts the global rows
    resampling     draws from the whole batch, gathered in rank order (the same batch, the same
                   seeded generator on every rank: every rank resamples the same features)
    the log        loss parts and L0 averaged over the whole batch, FVU against its variance

Schedules are pure functions of the step, so they need nothing. Every rank ends each step with
the same weights and optimiser state, so rank 0 alone writes the checkpoint (one file, the same
as a single process writes: a run resumes under any rank count, or none) and the SAEs. What
follows training (`TrainResult.collect`, e.g. evaluation) runs on SAEs r, r + world, ... of
each rank, as in sweep sharding.

What equals the single-process run to float noise: every loss that is a mean over rows (relu,
jumprelu, gated, topk, their penalties), dead-feature counts and resampling. Two terms are
decided per rank, as any DDP training decides them: batchtopk's (and matryoshka's) top k x N
over the batch is taken over each rank's N / world rows, and the aux-k loss of dead features
normalises by the variance of each rank's residual. Those SAEs train as well, but not to the
same numbers as one process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.evals.metrics import ReconstructionStats
from saelab.train.shard import Shard, interleave, one_each, rank_and_world
from saelab.train.trainer import SAETrainer

PARALLEL = ("sweep", "data")


def make_shard(n: int, parallel: str = "sweep") -> Shard:
    """The split of a group's work over torch.distributed ranks: whole SAEs ("sweep", the
    default) or the rows of every batch ("data")."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}; got {parallel!r}")
    return DataShard(n) if parallel == "data" else Shard(n)


class DataShard(Shard):
    """Every rank owns every SAE; rank r trains on the r-th slice of each batch; rank 0 writes
    the files (checkpoint, SAEs, log, config) and its values stand for all ranks'."""

    def __init__(self, n: int):
        self.n = n
        self.rank, self.world = rank_and_world()

    @property
    def indices(self) -> range:
        return range(self.n)

    @property
    def owns_files(self) -> bool:
        return self.rank == 0

    def checkpoint_name(self, name: str) -> str:
        return name  # one state for all ranks: the file a single process writes

    def gather(self, mine):
        return list(mine)  # after the reductions every rank holds the same values

    def collect(self, trained, fn):
        """Every rank holds every SAE, so each runs fn (e.g. evaluation) on SAEs r, r + world,
        ... only; the values come back from all ranks in spec order."""
        mine = one_each(fn, list(trained)[self.rank::self.world])
        if self.world == 1:
            return mine
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        return interleave(parts, self.n)

    def check_start(self, step: int) -> None:
        """Every rank must start from the same step (the one checkpoint, read by all)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        steps: list = [None] * self.world
        dist.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            raise ConfigError(f"the ranks start from steps {steps}: some do not see the run folder's "
                              "checkpoint.safetensors; put --out on a shared filesystem, or copy the "
                              "checkpoint and config.json to every node")

    def rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.world == 1:
            return x, y
        mine = x.tensor_split(self.world)[self.rank]
        return (mine, mine) if y is x else (mine, y.tensor_split(self.world)[self.rank])

    def trainer(self, spec, sae, total_steps: int, generator: torch.Generator) -> SAETrainer:
        cls = DataParallelTrainer if self.world > 1 else SAETrainer
        return cls(spec, sae, total_steps, generator)


class DataParallelTrainer(SAETrainer):
    """SAETrainer whose batch is split over the ranks of the default process group (see the
    module docstring for what is reduced)."""

    stackable = False  # its reductions live in `update`'s hooks, which a stacked step would skip

    def _sync_gradients(self, rows: int) -> int:
        import torch.distributed as dist

        params = [p for p in self.sae.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        had = params[0].new_tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = torch.cat([g.reshape(-1).float() * rows for g in grads] + [had, had.new_tensor([rows])])
        dist.all_reduce(flat)
        total = int(round(float(flat[-1])))
        parts = flat[:-1 - len(params)].split([p.numel() for p in params])
        for p, g, some in zip(params, parts, flat[-1 - len(params):-1]):
            # a parameter no rank computed a gradient for keeps none (Adam then skips it, as
            # it does in one process)
            p.grad = (g / max(total, 1)).view_as(p).to(p.dtype) if some > 0 else None
        return total

    def _sync_buffers(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for buf in self.sae.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world)

    def _sync_fired(self, fired: Tensor) -> Tensor:
        import torch.distributed as dist

        count = fired.to(torch.int32)
        dist.all_reduce(count)
        return count > 0

    def _whole_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        whole = _gather_rows(torch.cat([x, y], dim=1) if y is not x else x)
        return (whole, whole) if y is x else (whole[:, :x.shape[1]], whole[:, x.shape[1]:])

    def _batch_means(self, means: dict[str, float], rows: int) -> dict[str, float]:
        import torch.distributed as dist

        keys = list(means)
        sums = torch.tensor([rows] + [means[k] * rows for k in keys], dtype=torch.float64,
                            device=self.sae.W_enc.device)
        dist.all_reduce(sums)
        return {k: float(v / sums[0]) for k, v in zip(keys, sums[1:])}

    def _total_variance(self, y: Tensor) -> float:
        import torch.distributed as dist

        local = ReconstructionStats().update(y, y)
        packed = torch.cat([local.mean.new_tensor([local.n, float(local.m2)]), local.mean])
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, packed)
        stats = ReconstructionStats()
        for part in parts:  # rank order: the merge is the same on every rank
            one = ReconstructionStats()
            one.n, one.m2, one.mean = int(part[0]), part[1], part[2:]
            one.sse = one.cos_sum = part.new_zeros(())
            stats.merge(one)
        return stats.total_variance


def _gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows (n_r, d), concatenated in rank order (shares may differ in size)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    most = int(max(s.item() for s in all_sizes))
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], x.shape[1])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, all_sizes)])
