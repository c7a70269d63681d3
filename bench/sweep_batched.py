"""A sweep of 8 SAEs trained as one stacked pass (saelab.train.batched) against 8 separate runs,
data loading included, at two levels.

The training loop alone, three ways to train the same 8 SAEs (eight L1 coefficients of a relu
SAE at one width, and eight topk SAEs at one k with different initialisations), every run
reading shuffled batches from one activation cache on disk:

- separate: 8 GroupTrainer runs of one SAE each, each reading the cache (as 8 runs sharing a
  cache made once with `saelab cache` would);
- looped group: one GroupTrainer run of the 8, one read of the cache, each SAE stepped alone;
- stacked: the same run with the 8 stacked into batched products (the default).

That cache holds the offline default LM's activations (a random-init model of its size when
that LM is not built: bench.cache_throughput.load_lm) on random tokens. Repeats are interleaved and each time is the best of N.

Whole runs (`_whole_run_rows`): one `saelab train` run of the 8 against 8 runs of one SAE each,
where each run tokenises its text and caches its activations from the LM, trains, evaluates and
writes its outputs, as a loop of `saelab train` calls does; in the proportions of saelab
train's defaults (each activation seen about 4 times), on the default LM.

Run: `python bench/sweep_batched.py [--quick]`; `rows(quick, device)` is what `python -m bench`
collects.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from bench import PeakMemory, best_times, row, synchronize, timed  # noqa: E402
from bench.cache_throughput import load_lm  # noqa: E402
from bench.train_throughput import roofline  # noqa: E402
from saelab.train import GroupTrainer, TrainConfig  # noqa: E402
from saelab.train.batched import stacking  # noqa: E402
from saelab.train.spec import TrainSpec  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
FULL = dict(contexts=256, steps=20, batch=4096, expansion=4, repeats=2)
QUICK = dict(contexts=64, steps=10, batch=1024, expansion=4, repeats=2)
# whole `saelab train` runs, in the proportions of its defaults (expansion 8; steps x batch about
# 4 x the training tokens: 1000 x 4096 over 8192 contexts of 128), at a bench's size
RUN = dict(train_contexts=256, steps=32, batch=4096, eval_contexts=8, expansion=8)
QUICK_RUN = dict(train_contexts=32, steps=4, batch=1024, eval_contexts=2, expansion=8)


def _cache(lm, tmp: Path, n_contexts: int):
    """An activation cache of `n_contexts` contexts of random tokens at HOOK (timing does not
    depend on the text), made with `lm`."""
    from saelab.data.cache import cache_activations

    ctx = torch.randint(2, lm.d_vocab, (n_contexts, lm.context_length), generator=torch.Generator().manual_seed(0))
    ctx[:, 0] = 0
    return cache_activations(lm, ctx, [HOOK], tmp / "cache", progress=False)


def _specs(arch: str, expansion: float) -> list[TrainSpec]:
    if arch == "relu":
        return [TrainSpec(arch="relu", expansion=expansion, coefficient=c, lr=1e-3)
                for c in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20)]
    return [TrainSpec(arch="topk", expansion=expansion, k=32, lr=1e-3, name=f"topk_s{i}",
                      init="data" if i % 2 else "tied") for i in range(8)]


def _run(store, specs, out: Path, s: dict, stacked: bool, device: str = "cpu") -> None:
    cfg = TrainConfig(total_steps=s["steps"], checkpoint_every=s["steps"], log_every=10, device=device)
    with stacking(stacked):
        GroupTrainer(specs, store.dim(HOOK), out, cfg).fit(store.batches(HOOK, s["batch"], seed=0))


def _timings(store, arch: str, s: dict, tmp: Path, device: str) -> dict[str, float]:
    specs = _specs(arch, s["expansion"])
    ways = {
        "separate": lambda out: [_run(store, [spec], out / str(i), s, False, device) for i, spec in enumerate(specs)],
        "looped": lambda out: _run(store, specs, out, s, False, device),
        "stacked": lambda out: _run(store, specs, out, s, True, device),
    }
    best = {name: float("inf") for name in ways}
    for r in range(s["repeats"]):  # interleaved
        for name, way in ways.items():
            out = tmp / f"{arch}-{name}-{r}"
            synchronize(device)
            start = time.perf_counter()
            way(out)
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {arch} {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    return best


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return f"on {torch.cuda.get_device_name(torch.device(device))}"
    return f"{torch.get_num_threads()} threads"


def _roofline_s(d_in: int, d_sae: int, s: dict, device: str) -> float:
    """Seconds for the dense products alone of 8 SAEs' steps: 8 x steps x the five products."""
    products = roofline(d_in, d_sae, s["batch"], device, torch.float32)
    return 8 * s["steps"] * best_times({"roofline": products}, s["repeats"], device)["roofline"]


def rows(quick: bool = False, device: str = "cpu") -> list[dict]:
    """The sweep's rows with the SAEs training on `device` (the cache is read on the host, and
    batches bound for a GPU go through pinned memory, as in `saelab train`)."""
    s = QUICK if quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-sweep-"))
    try:
        lm, what = load_lm(tmp, device)  # makes the cache, then serves the whole runs
        store = _cache(lm, tmp, s["contexts"])
        d_in = store.dim(HOOK)
        d_sae = int(s["expansion"] * d_in)
        roof = _roofline_s(d_in, d_sae, s, device)
        out = []
        for arch in ("relu", "topk"):
            t = _timings(store, arch, s, tmp, device)
            with PeakMemory(device) as mem:  # one more stacked run, apart from the timings
                _run(store, _specs(arch, s["expansion"]), tmp / f"{arch}-peak", s, True, device)
            note = (f"8 {arch} SAEs d_in {d_in} d_sae {d_sae}, {s['steps']} steps of {s['batch']} rows read "
                    f"from an activation cache of {what} on random tokens; {_where(device)}; "
                    "seconds: less is better")
            refs = (("separate", "8 separate runs", "; target >= 3"), ("looped", "one group run, SAEs looped", ""),
                    ("roofline", "the dense products alone (8 SAEs x steps x 5)", "; at most ~1 where dense"))
            t["roofline"] = roof
            for ref, label, target in refs:
                out.append(row(f"sweep_batched.{arch}_vs_{ref}", round(t["stacked"], 3), "s (ratio: reference / stacked)",
                               label, round(t[ref], 3), ratio=t[ref] / t["stacked"], peak_mib=mem.mib,
                               note=note + target))
        return out + _whole_run_rows(lm, what, quick, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _whole_runs(lm, arch: str, r: dict, tmp: Path, device: str) -> dict[str, dict[str, float]]:
    """{"one": ..., "separate": ...}: seconds of data (tokenising + caching from the LM), of
    training, and of the whole run (with evaluation and writing the outputs) for one `saelab
    train` run of the 8 SAEs (stacked) and for 8 runs of one SAE each, summed. The LM is loaded
    once and handed to every run: separate command-line runs would each load it again."""
    from saelab.pipelines.train_lm import LMSweepConfig, run_lm_sweep

    def run(specs, out: Path) -> dict[str, float]:
        cfg = LMSweepConfig(specs=specs, hook=HOOK, train_contexts=r["train_contexts"], eval_contexts=r["eval_contexts"],
                            batch_size=r["batch"], steps=r["steps"], context_length=min(128, lm.context_length),
                            device=device)
        whole, mib, rows = timed(lambda: run_lm_sweep(cfg, out, lm=lm), device)
        shutil.rmtree(out, ignore_errors=True)
        t = rows[0]["timings"]
        return {"data": t["cache_s"], "train": t["train_s"], "whole": whole, "peak_mib": mib}

    specs = _specs(arch, r["expansion"])
    one = run(specs, tmp / f"{arch}-one")
    parts = [run([spec], tmp / f"{arch}-separate-{i}") for i, spec in enumerate(specs)]
    return {"one": one, "separate": {k: sum(p[k] for p in parts) for k in ("data", "train", "whole")}}


def _whole_run_rows(lm, what: str, quick: bool, device: str, tmp: Path) -> list[dict]:
    """One `saelab train` run of a sweep of 8 against 8 runs of one SAE each, where every run makes
    its own activations from the LM (the data loading a separate run pays): data + training, and
    the whole run with evaluation and outputs. Peak MiB: the one run's."""
    r = QUICK_RUN if quick else RUN
    out = []
    for arch in ("relu", "topk"):
        t = _whole_runs(lm, arch, r, tmp, device)
        d_in = lm.hook_dim(HOOK)
        note = (f"{what} {HOOK}: 8 {arch} SAEs d_sae {int(r['expansion'] * d_in)}, {r['steps']} steps of "
                f"{r['batch']} over {r['train_contexts']} contexts' activations (cached by each run), "
                f"{r['eval_contexts']} held-out contexts; the one run: data {t['one']['data']:.1f} s, training "
                f"{t['one']['train']:.1f} s; the 8 runs: data {t['separate']['data']:.1f} s, training "
                f"{t['separate']['train']:.1f} s; {_where(device)}; seconds: less is better")
        one, sep = t["one"], t["separate"]
        out.append(row(f"sweep_batched.{arch}_one_run_vs_8_runs (data + training)", one["data"] + one["train"],
                       "s (ratio: reference / one run)", "8 `saelab train` runs of one SAE each",
                       sep["data"] + sep["train"], ratio=(sep["data"] + sep["train"]) / (one["data"] + one["train"]),
                       peak_mib=one["peak_mib"], note=note + "; target >= 3"))
        out.append(row(f"sweep_batched.{arch}_one_run_vs_8_runs (whole run)", one["whole"],
                       "s (ratio: reference / one run)", "8 `saelab train` runs of one SAE each", sep["whole"],
                       ratio=sep["whole"] / one["whole"], peak_mib=one["peak_mib"],
                       note=note + "; with evaluation and the run's outputs"))
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for r in rows(quick="--quick" in sys.argv):
        print(r)
