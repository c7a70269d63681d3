"""A sweep sharded over two gloo ranks ends with exactly the single-process weights and metrics."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab.data.toy import ToyDataSource
from saelab.evals.entry import MetricsEntry, write_metrics
from saelab.evals.reconstruction import evaluate_saes
from saelab.sae import SAE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.spec import TrainSpec

TOY = dict(d=16, n_features=48, mean_active=3, batch_size=256, seed=3)
CFG = TrainConfig(total_steps=20, checkpoint_every=10, log_every=5, normalize_activations=True, seed=4)


def specs():
    return [
        TrainSpec(arch="relu", d_sae=48, coefficient=0.1, lr=5e-3, resample_every=7, dead_tokens=256),
        TrainSpec(arch="topk", d_sae=48, k=3, lr=5e-3, init="data", dead_tokens=256),
        TrainSpec(arch="jumprelu", d_sae=32, coefficient=0.01, lr=5e-3),
    ]


def train_and_evaluate(run_dir) -> list[MetricsEntry]:
    """What a pipeline does: train, evaluate each process's share, rank 0 writes metrics.json."""
    src = ToyDataSource(**TOY)
    result = GroupTrainer(specs(), 16, run_dir, CFG).fit(src)
    rows = result.collect(lambda mine: [MetricsEntry(t.label, m, spec=t.spec.to_dict())
                                        for t, m in zip(mine, evaluate_saes([t.sae for t in mine], [src.batch(999)]))])
    if result.writes:
        write_metrics(run_dir, rows)
    return rows


def _rank_main(rank: int, world: int, init_file: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    assert len(GroupTrainer(specs(), 16, run_dir, CFG).trainers) == (2 if rank == 0 else 1)
    rows = train_and_evaluate(run_dir)  # everything is on disk (fsynced) when it returns
    assert [r.name for r in rows] == ["relu_48_c0.1", "topk_48_k3", "jumprelu_32_c0.01"]  # every rank: all rows
    dist.barrier()  # both ranks done before either goes
    dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's background threads, destroyed there, abort the
    # process now and then ("terminate called without an active exception", ~1 run in 20).
    os._exit(0)


def test_two_gloo_ranks_match_one_process(tmp_path):
    rows = train_and_evaluate(tmp_path / "single")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "sharded")), nprocs=2, join=True)
    for label in [r.name for r in rows]:
        a = SAE.load(tmp_path / "single" / "saes" / label).state_dict()
        b = SAE.load(tmp_path / "sharded" / "saes" / label).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), label
    read = lambda run, name: (tmp_path / run / name).read_text()  # noqa: E731
    assert json.loads(read("single", "metrics.json")) == json.loads(read("sharded", "metrics.json"))
    assert read("single", "log.jsonl") == read("sharded", "log.jsonl")
    assert sorted(p.name for p in (tmp_path / "sharded").glob("checkpoint*")) == [
        "checkpoint.rank0of2.safetensors", "checkpoint.rank1of2.safetensors"]
    assert os.path.exists(tmp_path / "sharded" / "config.json")
