"""Stacked training of same-shaped SAEs (saelab.train.batched): the same weights, logs and files
as training each SAE in the loop, to float tolerance (the batched products sum in another
order: weights agree to rtol 1e-4 / atol 1e-5 after 30 Adam steps), and resumable."""

import json

import pytest
import torch

from saelab.data.toy import ToyDataSource
from saelab.errors import DataError
from saelab.sae import SAE
from saelab.sae.sparse_kernels import kernel_mode
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.batched import plan, stacking
from saelab.train.spec import TrainSpec

TOY = dict(d=16, n_features=48, mean_active=3, batch_size=128, seed=5)


def sweep_specs():
    """Three relu L1 values at one width and three topk SAEs of one k (differing in their
    initialisation), plus two SAEs that cannot stack: another width and a resampling relu."""
    common = dict(lr=5e-3, warmup_steps=5)
    specs = [TrainSpec(arch="relu", d_sae=48, coefficient=c, coefficient_warmup_steps=4, **common)
             for c in (0.0, 0.1, 0.3)]
    specs += [TrainSpec(arch="topk", d_sae=48, k=3, dead_tokens=300, name=f"topk{i}", init=init, **common)
              for i, init in enumerate(("tied", "data", "tied"))]
    specs += [TrainSpec(arch="relu", d_sae=32, coefficient=0.1, **common),
              TrainSpec(arch="relu", d_sae=48, coefficient=0.1, resample_every=10, dead_tokens=300, name="rs", **common)]
    return specs


class _Stops:
    """The toy stream, running out after `stop` batches (a run interrupted there)."""

    def __init__(self, stop):
        self.src, self.stop = ToyDataSource(**TOY), stop

    def iter_from(self, step):
        return self.src.iter_from(step, max(0, self.stop - step))


def _fit(path, specs, stacked, steps=30, source=None, **cfg):
    with stacking(stacked):
        trainer = GroupTrainer(specs, 16, path, TrainConfig(total_steps=steps, checkpoint_every=10, log_every=5, **cfg))
        trainer.fit(source or ToyDataSource(**TOY))
    return trainer


def _saved(path):
    return {p.name: SAE.load(p) for p in sorted((path / "saes").iterdir())}


def _assert_same_runs(a, b):
    saes_a, saes_b = _saved(a), _saved(b)
    assert saes_a.keys() == saes_b.keys()
    for label, sae in saes_a.items():
        other = saes_b[label]
        assert sae.cfg.to_dict() == other.cfg.to_dict()
        for name, value in sae.state_dict().items():
            torch.testing.assert_close(value, other.state_dict()[name], rtol=1e-4, atol=1e-5, msg=f"{label}.{name}")
    log_a, log_b = ([json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()] for p in (a, b))
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for label, entry in ra["saes"].items():
            assert entry.keys() == rb["saes"][label].keys()
            for key, value in entry.items():
                assert value == pytest.approx(rb["saes"][label][key], rel=1e-3, abs=1e-5), (label, key)


def test_plan_stacks_same_shaped_saes_and_leaves_the_rest_to_the_loop(tmp_path):
    trainer = GroupTrainer(sweep_specs(), 16, tmp_path, TrainConfig(total_steps=5))
    assert plan(trainer.trainers) == [[0, 1, 2], [3, 4, 5], [6], [7]]
    with stacking(False):
        assert plan(trainer.trainers) == [[i] for i in range(8)]


def test_a_cpu_stack_is_cut_to_keep_its_blocks_within_the_bound(tmp_path, monkeypatch):
    """On a CPU, a stack whose (n, rows, d_sae) float32 block would pass MAX_CPU_STACK_BYTES is cut
    into smaller stacks (a cut of one trains in the loop); the cut run still equals the loop."""
    import saelab.train.batched as batched

    trainer = GroupTrainer(sweep_specs(), 16, tmp_path / "plan", TrainConfig(total_steps=5))
    rows = TOY["batch_size"]
    monkeypatch.setattr(batched, "MAX_CPU_STACK_BYTES", 2 * 4 * rows * 48)  # two SAEs of d_sae 48
    assert plan(trainer.trainers, rows) == [[0, 1], [2], [3, 4], [5], [6], [7]]
    assert plan(trainer.trainers, rows // 2) == [[0, 1, 2], [3, 4, 5], [6], [7]]  # half the rows: 4 fit
    assert plan(trainer.trainers) == [[0, 1, 2], [3, 4, 5], [6], [7]]  # rows unknown: no cut
    _fit(tmp_path / "cut", sweep_specs(), stacked=True)
    _fit(tmp_path / "loop", sweep_specs(), stacked=False)
    _assert_same_runs(tmp_path / "loop", tmp_path / "cut")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_a_stacked_sweep_equals_the_looped_one(tmp_path, mode):
    with kernel_mode(mode):
        looped = _fit(tmp_path / "loop", sweep_specs(), stacked=False)
        stacked = _fit(tmp_path / "stack", sweep_specs(), stacked=True)
    _assert_same_runs(tmp_path / "loop", tmp_path / "stack")
    assert sorted(p.name for p in (tmp_path / "loop").iterdir()) == sorted(p.name for p in (tmp_path / "stack").iterdir())
    log = [json.loads(x) for x in (tmp_path / "stack" / "log.jsonl").read_text().splitlines()]
    assert any(r["saes"]["topk1"]["aux"] > 0 for r in log)  # aux-k ran on dead features
    for a, b in zip(looped.saes, stacked.saes):  # the trainers hold the final state
        torch.testing.assert_close(a.W_dec, b.W_dec, rtol=1e-4, atol=1e-5)


def test_unit_norm_relu_and_transcoders_stack_too(tmp_path):
    specs = [TrainSpec(arch="relu", d_sae=40, coefficient=c, decoder_norm="unit", lr=5e-3, warmup_steps=3) for c in (0.05, 0.2)]
    for stacked in (False, True):
        _fit(tmp_path / str(stacked), specs, stacked, steps=15, normalize_activations=True)
    _assert_same_runs(tmp_path / "False", tmp_path / "True")
    norms = [s.W_dec.norm(dim=1) for s in _saved(tmp_path / "True").values()]
    assert all(torch.allclose(n, n[0].expand_as(n), rtol=1e-4) for n in norms)  # unit rows, scale folded in


def test_a_stacked_run_resumes_from_a_checkpoint_written_by_either_path(tmp_path):
    specs = sweep_specs()[:6]
    _fit(tmp_path / "whole", specs, stacked=True)
    # 25 steps stacked (checkpoint at 20), then the rest looped from its checkpoint, and the other way round
    for first, second, name in ((True, False, "a"), (False, True, "b")):
        with pytest.raises(DataError, match="ran out at step 25"):
            _fit(tmp_path / name, specs, stacked=first, source=_Stops(25))
        _fit(tmp_path / name, specs, stacked=second)
        _assert_same_runs(tmp_path / "whole", tmp_path / name)


def test_data_parallel_trainers_and_a_nan_in_a_stack_are_handled(tmp_path):
    """A data-parallel trainer never stacks (its reductions live in `update`); a stacked SAE
    whose loss goes non-finite is caught like a looped one."""
    from saelab.train.data_parallel import DataParallelTrainer
    from saelab.train.trainer import SAETrainer

    specs = sweep_specs()[:3]
    trainers = [cls(s, SAE.from_config(s.sae_config(16)), 10, torch.Generator()) for s in specs
                for cls in (SAETrainer, DataParallelTrainer)]
    groups = plan(trainers)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 3]
    assert all(isinstance(trainers[i], SAETrainer) and not isinstance(trainers[i], DataParallelTrainer)
               for g in groups if len(g) > 1 for i in g)
    blowup = [TrainSpec(arch="relu", d_sae=48, coefficient=c, lr=1e30, warmup_steps=1) for c in (0.1, 0.3)]
    with pytest.raises(DataError, match="NaN or Inf"):
        _fit(tmp_path / "nan", blowup, stacked=True)
