"""Activation cache: what is written equals a direct forward pass; resume; shuffles; live mode."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.data.cache import (ShuffledBatches, cache_activations, live_batches,
                               model_fingerprint, open_cache)
from saelab.data.cache import format as fmt
from saelab.data.cache.shuffle import as_pair, hook_rows
from saelab.errors import CorruptFileError, DataError, MissingFileError
from saelab.lm.hooked import HookedLM

L, VOCAB = 16, 64  # the tiny models of conftest.save_tiny_hf_model: context 16, vocab 64
H0, H1, MLP0 = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, save_tiny_hf):
    return save_tiny_hf("gpt_neox", tmp_path_factory.mktemp("lm") / "tiny", seed=0)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return HookedLM.load(lm_dir)


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory, save_tiny_hf):
    """Same architecture and tokenizer, other weights."""
    return HookedLM.load(save_tiny_hf("gpt_neox", tmp_path_factory.mktemp("lm") / "other", seed=1))


def make_contexts(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(2, VOCAB, (n, L), generator=g)
    ctx[:, 0] = 0
    return ctx


def reference(lm, ctx, hook, first=1):
    """Activations computed another way: one plain forward over all contexts at once."""
    return lm.run_with_cache(ctx, [hook])[hook][:, first:].reshape(-1, lm.hook_dim(hook))


def blocks(ctx, size):
    """Contexts as a stream of blocks, then single rows (a generator, not an array)."""
    head = len(ctx) - 3
    for i in range(0, head, size):
        yield ctx[i:min(i + size, head)]
    yield from ctx[head:]


def count_forwards(lm, monkeypatch) -> list:
    """Count the contexts the LM runs on (wraps the real method; the model still runs)."""
    seen, real = [], lm.run_with_cache

    def counting(tokens, names, **kw):
        seen.append(len(tokens))
        return real(tokens, names, **kw)
    monkeypatch.setattr(lm, "run_with_cache", counting)
    return seen


def read_all(cache, hook):
    chunks = list(cache.sequential(hook, batch_size=50))
    return [torch.cat(col) for col in zip(*chunks)]


# ---- writing ----------------------------------------------------------------------------------
def test_cached_rows_equal_a_direct_forward(lm, tmp_path):
    ctx = make_contexts(30)
    cache = cache_activations(lm, blocks(ctx, 4), [H0, H1], tmp_path / "c", shard_contexts=7,
                              meta={"corpus": "random"})
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["complete"] and m["contexts_done"] == 30 and m["tokens_done"] == 30 * (L - 1)
    assert [h["dim"] for h in m["hooks"]] == [32, 64] and m["drop_bos"] and m["meta"]["corpus"]
    assert m["shards_done"] == 5 and m["shard_contexts"] == 7
    assert np.array_equal(np.load(tmp_path / "c" / "tokens" / "00004.npy"), ctx[28:30].numpy())
    assert m["model"]["fingerprint"] == model_fingerprint(lm) and m["tokenizer_fingerprint"]
    for hook in (H0, H1):
        acts, tokens, cidx, pos = read_all(cache, hook)
        torch.testing.assert_close(acts, reference(lm, ctx, hook), rtol=1e-5, atol=1e-6)
        assert torch.equal(tokens, ctx[:, 1:].reshape(-1))
        assert torch.equal(ctx[cidx, pos], tokens)
        assert pos.min() == 1 and pos.max() == L - 1
    assert torch.equal(cache.context_tokens([29, 3, 29]), ctx[[29, 3, 29]])  # BOS included
    start, stop = fmt.shard_range(cache.manifest, 1)  # the storage layout: one .npy per hook and shard
    shard = fmt.load_npy(fmt.acts_path(cache.path, H1, 1), ((stop - start) * (L - 1), 64), np.dtype(np.float32))
    assert isinstance(shard, np.memmap) and shard.shape == (7 * (L - 1), 64)
    assert np.array_equal(shard, reference(lm, ctx[7:14], H1).numpy())


@pytest.mark.parametrize("dtype,stored", [("fp16", np.float16), ("bf16", np.uint16)])
def test_half_precision_round_trips_exactly(lm, tmp_path, dtype, stored):
    ctx = make_contexts(6)
    cache = cache_activations(lm, ctx, H0, tmp_path / "c", dtype=dtype)
    want = reference(lm, ctx, H0).to({"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    acts = read_all(cache, H0)[0]
    assert acts.dtype == torch.float32 and torch.equal(acts, want.float())
    raw = np.load(tmp_path / "c" / "acts" / H0 / "00000.npy")
    assert raw.dtype == stored
    assert np.array_equal(raw.view(np.int16), want.view(torch.int16).numpy())


def test_keeping_bos_keeps_position_zero(lm, tmp_path):
    ctx = make_contexts(5)
    cache = cache_activations(lm, ctx, H0, tmp_path / "c", drop_bos=False)
    acts, tokens, _, pos = read_all(cache, H0)
    assert cache.n_tokens == 5 * L and pos[0] == 0 and torch.equal(tokens, ctx.reshape(-1))
    torch.testing.assert_close(acts, reference(lm, ctx, H0, first=0), rtol=1e-5, atol=1e-6)


def run_child(script: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python (one thread, the repository as working directory)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=capture)


def test_writer_memory_does_not_grow_with_tokens(lm_dir, tmp_path):
    """Peak RSS (what torch's allocator uses too, unlike tracemalloc) of a fresh process does
    not grow when it caches 4N contexts after N. A positive control in the same process keeps
    every forward pass's activations, the leak this guards against, and must be seen.

    The peak is VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked
    from a big pytest process starts with the parent's peak and would hide any growth."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc/self/status (VmHWM)")
    n, shard = 256, 64
    script = f"""
        import json, torch
        torch.set_num_threads(1)
        from saelab.data.cache import cache_activations
        from saelab.lm.hooked import HookedLM
        from tests.test_cache import make_contexts
        lm, kept = HookedLM.load({str(lm_dir)!r}), []
        hooks, clean = lm.hook_names(), lm.run_with_cache
        def leaky(*args, **kwargs):
            kept.append(clean(*args, **kwargs))
            return kept[-1]
        def peak_mib(n, leak=False):
            lm.run_with_cache = leaky if leak else clean
            cache_activations(lm, (c for c in make_contexts(n)), hooks,
                              {str(tmp_path)!r} + f"/{{n}}{{leak}}", shard_contexts={shard},
                              progress=False)
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB -> MiB
        print(json.dumps([peak_mib({n}), peak_mib({4 * n}), peak_mib({4 * n}, leak=True),
                          sum(lm.hook_dim(h) for h in hooks)]))
        """
    proc = run_child(script, capture=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large, leaky, width = json.loads(proc.stdout.strip().splitlines()[-1])
    leak_mib = 3 * n * L * width * 4 / 2**20  # 3N more contexts' activations, every hook
    assert leak_mib > 20 and 2 * shard * L * width * 4 / 2**20 < 10  # buffers << a leak
    assert large - small < 0.25 * leak_mib, (small, large, leak_mib)
    assert leaky - large > 0.75 * leak_mib, (large, leaky, leak_mib)  # the measure sees leaks


# ---- resuming ---------------------------------------------------------------------------------
def interrupted(ctx, after):
    for i, row in enumerate(ctx):
        if i == after:
            raise KeyboardInterrupt
        yield row


def test_interrupted_write_resumes_to_the_same_cache(lm, tmp_path, monkeypatch):
    ctx, path = make_contexts(40), tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        cache_activations(lm, interrupted(ctx, 21), [H0, H1], path, shard_contexts=8)
    with pytest.raises(DataError, match="unfinished"):
        open_cache(path)
    partial = open_cache(path, require_complete=False)
    assert not partial.complete and partial.n_contexts == 16
    (path / "acts" / H0 / "00002.npy").write_bytes(b"half a shard")  # left by a crash
    (path / "tokens" / ".00002.npy.x.tmp").write_bytes(b"junk")
    seen = count_forwards(lm, monkeypatch)
    resumed = cache_activations(lm, ctx, [H0, H1], path, shard_contexts=8)
    assert sum(seen) == 40 - 16  # finished shards are not recomputed
    monkeypatch.undo()
    fresh = cache_activations(lm, ctx, [H0, H1], tmp_path / "fresh", shard_contexts=8)
    assert resumed.manifest == {**fresh.manifest, "meta": {}} and resumed.complete
    for hook in (H0, H1):
        for a, b in zip(read_all(resumed, hook), read_all(fresh, hook)):
            assert torch.equal(a, b)
    assert not (path / "tokens" / ".00002.npy.x.tmp").exists()


@pytest.mark.slow
def test_resume_after_kill_9(lm_dir, lm, tmp_path):
    """A writer killed by SIGKILL mid-run leaves a cache that is unfinished, never complete,
    and resumes to the same result."""
    path = tmp_path / "c"
    script = f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from saelab.data.cache import cache_activations
        from saelab.lm.hooked import HookedLM
        from tests.test_cache import make_contexts
        def rows():
            for i, row in enumerate(make_contexts(40)):
                if i == 27:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield row
        cache_activations(HookedLM.load({str(lm_dir)!r}), rows(), [{H0!r}], {str(path)!r},
                          shard_contexts=6, progress=False)
        """
    proc = run_child(script)
    assert proc.returncode == -signal.SIGKILL
    partial = open_cache(path, require_complete=False)  # checks every counted file exists
    assert not partial.complete and partial.n_contexts in (12, 18, 24)  # last write may be lost
    resumed = cache_activations(lm, make_contexts(40), H0, path, shard_contexts=6)
    fresh = cache_activations(lm, make_contexts(40), H0, tmp_path / "fresh", shard_contexts=6)
    assert torch.equal(read_all(resumed, H0)[0], read_all(fresh, H0)[0])


def test_resume_refuses_other_data_or_options(lm, other_lm, tmp_path, monkeypatch):
    ctx, path = make_contexts(12), tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        cache_activations(lm, interrupted(ctx, 9), H0, path, shard_contexts=4)
    with pytest.raises(DataError, match="contexts given differ"):
        cache_activations(lm, make_contexts(12, seed=1), H0, path, shard_contexts=4)
    with pytest.raises(DataError, match="dtype"):
        cache_activations(lm, ctx, H0, path, shard_contexts=4, dtype="fp16")
    with pytest.raises(DataError, match="hooks"):
        cache_activations(lm, ctx, [H0, H1], path, shard_contexts=4)
    with pytest.raises(DataError, match="model fingerprint"):
        cache_activations(other_lm, ctx, H0, path, shard_contexts=4)
    cache_activations(lm, ctx, H0, path)  # default shard size: the recorded one stands
    seen = count_forwards(lm, monkeypatch)
    assert cache_activations(lm, ctx, H0, path).complete and seen == []
    with pytest.raises(DataError, match="complete"):
        cache_activations(lm, make_contexts(13), H0, path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an activation cache"):
        cache_activations(lm, ctx, H0, tmp_path / "other")


# ---- opening ----------------------------------------------------------------------------------
def test_open_checks_model_hooks_and_files(lm, lm_dir, other_lm, tmp_path):
    path = tmp_path / "c"
    cache_activations(lm, make_contexts(8), [H0, H1], path, shard_contexts=4)
    assert open_cache(path, model=lm, hooks=[H1]).dim(H1) == 64
    moved = HookedLM.load(shutil.copytree(lm_dir, tmp_path / "moved"))  # same model elsewhere
    assert open_cache(path, model=moved).model_name == str(lm_dir)
    with pytest.raises(DataError, match="fingerprint"):
        open_cache(path, model=other_lm)
    with pytest.raises(DataError, match="hook_resid_post"):
        open_cache(path, hooks=MLP0)
    with pytest.raises(DataError, match="holds"):
        open_cache(path).batches(MLP0, 8)
    with pytest.raises(MissingFileError):
        open_cache(tmp_path / "nothing")
    np.save(path / "acts" / H1 / "00001.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(CorruptFileError, match="manifest says"):
        list(open_cache(path).sequential(H1))
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        open_cache(path)


# ---- shuffled batches -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_cache(lm, tmp_path_factory):
    ctx = make_contexts(40, seed=2)
    return cache_activations(lm, ctx, [H0, MLP0], tmp_path_factory.mktemp("pairs") / "c",
                             shard_contexts=6), ctx


def row_keys(x):
    return [bytes(r) for r in x.numpy()]


def test_an_epoch_is_a_shuffled_permutation_of_aligned_pairs(pair_cache):
    cache, _ = pair_cache
    x_all, _, cidx, _ = read_all(cache, H0)
    y_all = read_all(cache, MLP0)[0]
    y_of = dict(zip(row_keys(x_all), row_keys(y_all)))
    context_of = dict(zip(row_keys(x_all), cidx.tolist()))
    batches = cache.batches(H0, 40, target=MLP0, seed=1, epochs=1, buffer_mb=0.03)
    assert batches.window_contexts < cache.n_contexts  # memory bound by a window, not the cache
    assert batches.window_contexts * batches.rows_per_context * (32 + 32) * 4 <= 0.03 * 2**20
    got = list(batches)
    assert len(got) == len(batches) == 40 * (L - 1) // 40
    xs = torch.cat([x for x, _ in got])
    assert sorted(row_keys(xs)) == sorted(row_keys(x_all))  # every row once
    for x, y in got:
        assert row_keys(y) == [y_of[k] for k in row_keys(x)]  # target aligned with input
    assert len({context_of[k] for k in row_keys(got[0][0])}) >= 5  # mixed across contexts
    assert not torch.equal(xs, x_all)


def test_batches_are_deterministic_and_resume_exactly(pair_cache):
    cache, _ = pair_cache
    make = lambda seed: cache.batches(H0, 37, seed=seed, buffer_mb=0.02)  # noqa: E731
    b = make(4)
    per_epoch = cache.n_tokens / 37
    first = list(islice(iter(b), int(3 * per_epoch)))
    assert all(x.shape == (37, 32) for x in first)
    window_steps = b.window_contexts * b.rows_per_context // 37
    for step in (0, 1, window_steps, window_steps + 1, int(per_epoch), int(2 * per_epoch) + 2):
        resumed = list(islice(b.iter_from(step), 3))
        assert all(torch.equal(a, c) for a, c in zip(resumed, first[step:step + 3])), step
    assert all(torch.equal(a, c) for a, c in zip(islice(make(4), 5), first))
    assert not torch.equal(next(iter(make(5))), first[0])
    rows, n = torch.cat(first), cache.n_tokens
    epoch1, epoch2 = rows[:n], rows[n:2 * n]
    assert sorted(row_keys(epoch1)) == sorted(row_keys(epoch2))
    assert not torch.equal(epoch1, epoch2)  # a new order each epoch


def test_live_batches_equal_disk_batches(lm, pair_cache):
    cache, ctx = pair_cache
    disk = cache.batches(H0, 50, target=MLP0, seed=7, buffer_mb=0.05)
    live = live_batches(lm, ctx, H0, 50, target=MLP0, seed=7, buffer_mb=0.05,
                        forward_batch_size=3)
    assert live.window_contexts == disk.window_contexts
    for (x1, y1), (x2, y2) in zip(islice(disk.iter_from(10), 20), islice(live.iter_from(10), 20)):
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    single = next(iter(live_batches(lm, ctx, H0, 50, seed=7, buffer_mb=0.05)))
    assert single.shape == (50, 32)


def test_hook_rows_and_batch_pairs(lm):
    ctx = make_contexts(5)
    rows = hook_rows(lm, ctx, [MLP0, H0, H1])
    assert list(rows) == [MLP0, H0, H1]
    for h in (H0, H1, MLP0):
        torch.testing.assert_close(rows[h], reference(lm, ctx, h), rtol=0, atol=0)
    assert hook_rows(lm, ctx, [H0], drop_bos=False)[H0].shape == (5 * L, 32)
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    assert as_pair(x)[0] is x and as_pair(x)[1] is x and as_pair((x, y)) == (x, y)
    with pytest.raises(DataError, match="x or \\(x, y\\)"):
        as_pair((x, y, x))


def test_in_memory_live_batches_run_the_lm_once_and_resume_exactly(lm, monkeypatch):
    ctx = make_contexts(6, seed=4)
    forwards = count_forwards(lm, monkeypatch)
    batches = live_batches(lm, ctx, H0, 8, target=MLP0, seed=3, forward_batch_size=4, in_memory=True)
    first = list(islice(iter(batches), 40))  # 40 * 8 rows: over 3 epochs of 6 * 15 rows
    assert forwards == [4, 2]  # one pass over the contexts, whatever the number of epochs
    x_all, y_all = reference(lm, ctx, H0), reference(lm, ctx, MLP0)
    y_of = dict(zip(row_keys(x_all), row_keys(y_all)))
    epoch = torch.cat([x for x, _ in first])[:90]
    assert sorted(row_keys(epoch)) == sorted(row_keys(x_all))  # an epoch: every row once
    assert all(row_keys(y) == [y_of[k] for k in row_keys(x)] for x, y in first)  # pairs stay aligned
    for step in (0, 11, 12, 23, 35):
        resumed = live_batches(lm, ctx, H0, 8, target=MLP0, seed=3, in_memory=True).iter_from(step)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(islice(resumed, 3), first[step:step + 3])), step


def test_shuffler_checks_its_inputs():
    load = lambda ids: (torch.arange(len(ids) * 2.0)[:, None],)  # noqa: E731
    with pytest.raises(ValueError):
        ShuffledBatches(load, 4, 2, 0, 1)
    endless = ShuffledBatches(load, 4, 2, 3, 2)
    with pytest.raises(TypeError):
        len(endless)
    short = ShuffledBatches(lambda ids: (torch.zeros(1, 1),), 4, 2, 3, 2)
    with pytest.raises(DataError, match="rows"):
        next(iter(short))


def test_a_training_run_resumes_on_cache_batches(pair_cache, tmp_path):
    """GroupTrainer interrupted mid-run and resumed on cache.batches ends with the same SAE."""
    from saelab.sae import SAE
    from saelab.train import GroupTrainer, TrainConfig
    from saelab.train.spec import TrainSpec

    cache, _ = pair_cache
    spec = lambda: [TrainSpec(arch="topk", d_sae=64, k=4, lr=3e-3, warmup_steps=2)]  # noqa: E731
    cfg = TrainConfig(total_steps=12, checkpoint_every=4, log_every=4, seed=1)
    src = cache.batches(H0, 64, target=MLP0, seed=3, buffer_mb=0.05)

    def crash(step, _):
        if step == 6:
            raise KeyboardInterrupt
    GroupTrainer(spec(), 32, tmp_path / "full", cfg, d_out=32).fit(src)
    with pytest.raises(KeyboardInterrupt):
        GroupTrainer(spec(), 32, tmp_path / "cut", cfg, d_out=32, on_step=crash).fit(src)
    GroupTrainer(spec(), 32, tmp_path / "cut", cfg, d_out=32).fit(src)
    a, b = (SAE.load(next((tmp_path / r / "saes").iterdir())).state_dict() for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_stops_after_the_last_hooked_block_and_matches_the_full_forward(tiny_lm, tmp_path):
    """Caching blocks.0 hooks never runs block 1, and stores what HF's full forward computes
    (its hidden state after block 0), one pass for both hooks."""
    from saelab.data.cache import cache_activations

    toks = torch.randint(1, 500, (5, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    later = tiny_lm.blocks[1].register_forward_hook(lambda *a: calls.append("block1"))
    first = tiny_lm.blocks[0].register_forward_hook(lambda *a: calls.append("block0"))
    try:
        cache = cache_activations(tiny_lm, toks, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"],
                                  tmp_path / "c", batch_size=5, progress=False)
    finally:
        later.remove()
        first.remove()
    assert calls == ["block0"]  # one pass (batch_size 5) for both hooks, stopped before block 1
    with torch.no_grad():
        full = tiny_lm.model(input_ids=toks, output_hidden_states=True).hidden_states[1]
    rows = next(iter(cache.sequential("blocks.0.hook_resid_post", batch_size=10_000))).acts
    assert torch.allclose(rows, full[:, 1:].reshape(-1, full.shape[-1]), atol=1e-5)
