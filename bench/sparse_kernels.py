"""The sparse kernels (saelab.sae.sparse_kernels) against the dense roofline of the same shapes.

One training step (forward, backward, Adam) of a topk SAE on the sparse path, and the same step
forced onto the dense path, against the roofline of a dense step: the five dense products
x @ W_enc, f @ W_dec, g @ W_dec^T, f^T @ g, x^T @ g_z timed alone (what any step built from dense
products must at least do). Where sae-lens is importable, its topk training step on the same
shapes too. Repeats are interleaved (the machine is shared) and each time is the best of N.

Run: `python bench/sparse_kernels.py [--quick]`; `rows(quick)` is what `python -m bench` collects.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from bench import PeakMemory, best_times  # noqa: E402
from bench.train_throughput import K, peer_in_child, roofline, saelens_available  # noqa: E402
from saelab.sae import SAE  # noqa: E402
from saelab.sae.sparse_kernels import kernel_mode  # noqa: E402
from saelab.train.spec import TrainSpec  # noqa: E402
from saelab.train.trainer import SAETrainer  # noqa: E402

FULL = dict(d_in=512, d_sae=16384, batch=4096, k=K, repeats=3)  # K: the peer step's k too
QUICK = dict(d_in=256, d_sae=4096, batch=1024, k=K, repeats=3)


def _saelab_step(mode: str, d_in: int, d_sae: int, batch: int, k: int):
    torch.manual_seed(0)
    spec = TrainSpec(arch="topk", d_sae=d_sae, k=k)
    trainer = SAETrainer(spec, SAE.from_config(spec.sae_config(d_in)), 10_000, torch.Generator().manual_seed(0))
    x = torch.randn(batch, d_in)
    steps = iter(range(10_000))

    def step():
        with kernel_mode(mode):
            trainer.update(next(steps), x, x, log=False)

    return step


def rows(quick: bool = False) -> list[dict]:
    s = QUICK if quick else FULL
    shape = dict(d_in=s["d_in"], d_sae=s["d_sae"], batch=s["batch"])
    fns = {"roofline": roofline(**shape, device="cpu", dtype=torch.float32),
           "sparse": _saelab_step("sparse", **shape, k=s["k"]), "dense": _saelab_step("dense", **shape, k=s["k"])}
    t = best_times(fns, s["repeats"])
    if saelens_available():  # in its own process, as in train_throughput
        t["saelens"] = peer_in_child("topk", **shape, repeats=s["repeats"], device="cpu", bf16=False)[0]
    what = f"topk k {s['k']}, d_in {s['d_in']}, d_sae {s['d_sae']}, batch {s['batch']}, {torch.get_num_threads()} threads"
    with PeakMemory() as mem:  # one sparse step, measured apart from the timings
        fns["sparse"]()
    peak = None if mem.mib is None else round(mem.mib, 1)

    def row(name, value, ref, ref_value, note):
        return {"row": name, "value": round(value, 4), "unit": "s/step", "reference": ref,
                "reference_value": round(ref_value, 4), "ratio": round(ref_value / value, 2),
                "peak_mib": peak, "note": f"{what}; {note}"}

    out = [
        row("sparse_kernels.topk_step", t["sparse"], "dense roofline (5 products)", t["roofline"],
            "ratio = roofline / sparse step (target >= 2)"),
        row("sparse_kernels.topk_step_vs_dense_path", t["sparse"], "saelab dense path", t["dense"],
            "ratio = dense-path step / sparse step"),
    ]
    if "saelens" in t:
        out.append(row("sparse_kernels.topk_step_vs_saelens", t["sparse"], "SAELens topk step", t["saelens"],
                       "ratio = SAELens step / sparse step (target >= 3)"))
    else:
        out[0]["note"] += "; sae-lens not importable here, so no SAELens row"
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for r in rows(quick="--quick" in sys.argv):
        print(r)
