"""Data-parallel training (parallel="data") over two gloo ranks ends where one process ends,
within float noise: the same global batches, each rank on its slice, gradients, dead-feature
counts, resampling and the log reduced across ranks; one checkpoint; resume after a crash."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab.data.toy import ToyDataSource
from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.data_parallel import DataShard, make_shard
from saelab.train.spec import TrainSpec

# an odd batch: the ranks' shares differ (128 and 127 rows), so the reductions must weight them
TOY = dict(d=16, n_features=48, mean_active=3, batch_size=255, seed=3)
CFG = TrainConfig(total_steps=20, checkpoint_every=10, log_every=5, normalize_activations=True, seed=4)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 sums taken in another order, through 20 Adam steps


def specs():
    return [
        # a strong penalty: features die within a batch, and are resampled every 5 steps
        TrainSpec(arch="relu", d_sae=96, coefficient=10.0, lr=3e-2, warmup_steps=0, resample_every=5, dead_tokens=255),
        TrainSpec(arch="topk", d_sae=48, k=3, lr=5e-3, init="data"),
        TrainSpec(arch="jumprelu", d_sae=32, coefficient=0.01, lr=5e-3),
    ]


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(done, _entries):
        if done == step:
            raise Crash
    return on_step


def _rank_main(rank: int, world: int, init_file: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    src = ToyDataSource(**TOY)
    with pytest.raises(Crash):  # dies after the step-10 checkpoint ...
        GroupTrainer(specs(), 16, run_dir, CFG, parallel="data", on_step=_crash_at(13)).fit(src)
    trainer = GroupTrainer(specs(), 16, run_dir, CFG, parallel="data")  # ... and resumes from it
    assert len(trainer.trainers) == 3 and type(trainer.trainers[0]).__name__ == "DataParallelTrainer"
    result = trainer.fit(src)
    assert result.writes == (rank == 0)
    seen = []  # collect (evaluation) splits the SAEs over the ranks and gathers in spec order
    assert result.collect(lambda mine: seen.extend(mine) or [t.label for t in mine]) == trainer.labels
    assert [t.label for t in seen] == trainer.labels[rank::world]
    mine = torch.cat([p.detach().reshape(-1) for t in trainer.trainers for p in t.sae.parameters()])
    both = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(both, mine)
    assert torch.equal(both[0], both[1])  # every rank holds the same SAEs
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_distributed: skip the teardown of gloo's threads


def test_two_data_parallel_ranks_match_one_process(tmp_path):
    GroupTrainer(specs(), 16, tmp_path / "single", CFG).fit(ToyDataSource(**TOY))
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    for label in [s.label(16) for s in specs()]:
        a = SAE.load(tmp_path / "single" / "saes" / label).state_dict()
        b = SAE.load(tmp_path / "ddp" / "saes" / label).state_dict()
        for k in a:
            torch.testing.assert_close(b[k], a[k], **TOL, msg=f"{label} {k}")
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    single, ddp = lines("single"), lines("ddp")
    assert [r["step"] for r in ddp] == [5, 10, 15, 20] and [r["tokens"] for r in ddp] == [r["tokens"] for r in single]
    for one, two in zip(single, ddp):
        for label, entry in one["saes"].items():
            assert entry.keys() == two["saes"][label].keys()
            for key, value in entry.items():
                assert two["saes"][label][key] == pytest.approx(value, rel=1e-3, abs=1e-5), (one["step"], label, key)
    assert any("resampled" in e for r in ddp for e in r["saes"].values())  # resampling ran, on the whole batch
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint*")) == ["checkpoint.safetensors"]


def test_data_shard_splits_rows_and_one_process_is_plain():
    shard = DataShard(3)
    assert (shard.rank, shard.world, list(shard.indices), shard.owns_files) == (0, 1, [0, 1, 2], True)
    x = torch.arange(10.0).reshape(5, 2)
    assert shard.rows(x, x)[0] is x
    shard.rank, shard.world = 1, 2
    a, b = shard.rows(x, x + 1)
    assert torch.equal(a, x[3:]) and torch.equal(b, x[3:] + 1)
    assert shard.checkpoint_name("checkpoint.safetensors") == "checkpoint.safetensors"
    assert not shard.owns_files and shard.gather([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ConfigError, match="parallel must be one of sweep, data"):
        make_shard(3, "model")


def _once_main(rank: int, world: int, init_file: str, root: str) -> None:
    """Two ranks posing as the first process of two nodes with their own disks: each node's
    folder is root/node<rank>; rank 0 writes its own, and rank 1, not seeing one, writes its."""
    from pathlib import Path

    from saelab.train.shard import once

    os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mine = Path(root) / f"node{rank}"
    calls = []
    once(lambda: calls.append(mine.mkdir()), present=mine.exists)
    assert mine.exists() and len(calls) == 1
    shared = Path(root) / "shared"  # a folder both see: written once, by rank 0
    once(lambda: (shared.mkdir(), (shared / f"by{rank}").touch()), present=shared.exists)
    assert [p.name for p in shared.iterdir()] == ["by0"]
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_once_writes_one_copy_per_filesystem(tmp_path):
    mp.spawn(_once_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "node0").is_dir() and (tmp_path / "node1").is_dir()


def test_cache_complete(tmp_path, tiny_lm):
    from saelab.data.cache import cache_activations, cache_complete

    assert not cache_complete(tmp_path / "none")
    tokens = torch.randint(0, 100, (4, 8))
    cache_activations(tiny_lm, tokens, "blocks.0.hook_resid_post", tmp_path / "c", progress=False)
    assert cache_complete(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{")
    assert not cache_complete(tmp_path / "c")


def _mismatch_main(rank: int, world: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = DataShard(3)
    with pytest.raises(ConfigError, match=r"start from steps \[10, 0\]"):
        shard.check_start(10 if rank == 0 else 0)
    shard.check_start(7)  # the same step everywhere: fine
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_ranks_that_do_not_see_the_checkpoint_stop(tmp_path):
    mp.spawn(_mismatch_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
