"""A sweep of 8 SAEs trained in one pass over an activation cache (GroupTrainer: every SAE sees
each batch as it is read) against 8 separate runs, each reading the cache again. Data loading,
scaling, checkpoint-free training and saving the SAEs are all inside the timings.

The cache holds the offline default LM's `blocks.0.hook_resid_post` where that model is built,
else a random-init model of the same shape (bench.cache_throughput.load_lm). The sweep: relu
SAEs, expansion 8, eight L1 coefficients.

    python -m bench.sweep_looped [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench import PeakMemory, row

HOOK = "blocks.0.hook_resid_post"


def _run(specs, d_in: int, store, run_dir: Path, steps: int, batch: int) -> None:
    from saelab.train.group import GroupTrainer, TrainConfig

    config = TrainConfig(total_steps=steps, checkpoint_every=10 * steps, log_every=10 * steps)
    GroupTrainer(specs, d_in, run_dir, config).fit(store.batches(HOOK, batch, seed=0))


def rows(quick: bool) -> list[dict]:
    from bench.cache_throughput import contexts_for, load_lm
    from saelab.data.cache import cache_activations
    from saelab.train.spec import TrainSpec

    n_saes, steps, batch, n_ctx = (8, 3, 256, 16) if quick else (8, 20, 4096, 512)
    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-sweep-"))
    try:
        lm, what = load_lm(tmp)
        ctx = contexts_for(lm, n_ctx, random_tokens=what != "default LM")
        store = cache_activations(lm, ctx, [HOOK], tmp / "cache", batch_size=32, progress=False)
        d_in = lm.d_model
        specs = [TrainSpec(arch="relu", expansion=8, coefficient=0.5 * 2 ** i) for i in range(n_saes)]
        with PeakMemory() as one_pass:
            start = time.perf_counter()
            _run(specs, d_in, store, tmp / "sweep", steps, batch)
            t_sweep = time.perf_counter() - start
        with PeakMemory() as separate:
            start = time.perf_counter()
            for i, spec in enumerate(specs):
                _run([spec], d_in, store, tmp / f"run{i}", steps, batch)
            t_apart = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = n_saes * steps * batch
    return [row(f"sweep of {n_saes} relu SAEs in one pass (d_in {d_in}, d_sae {8 * d_in}, batch {batch}, "
                f"{steps} steps)", tokens / t_sweep, "SAE-tokens/s (ratio: speed-up over separate runs)",
                f"{n_saes} separate runs, each reading the cache", tokens / t_apart, peak_mib=one_pass.mib,
                note=f"{what}; separate runs' peak {separate.mib:.0f} MiB" if separate.mib is not None else what)]


if __name__ == "__main__":
    from bench.__main__ import print_table

    print_table(rows(quick=False))
