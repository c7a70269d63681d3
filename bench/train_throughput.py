"""Training tokens/s of one SAE step, against the roofline of its matrix products and, where
sae-lens is importable, against SAELens's own training step on the same batch and shapes.

Roofline: the five dense products a dense SAE step must do — x @ W_enc, f @ W_dec, and in the
backward pass g @ W_dec^T, f^T @ g, x^T @ g_z — timed alone (in bf16 on a GPU, where the step
runs under bf16 autocast). The ratio is saelab's tokens/s over the roofline's: at most 1 for
the dense architectures; topk decodes sparsely, so it may pass 1. SAELens's step is what its
trainer does per batch: forward, the firing counts, backward, gradient clipping, Adam.

    python -m bench.train_throughput [--quick] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import PeakMemory, best_times, row

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
K = 32
SHAPES = [(512, 4096, 4096), (512, 16384, 4096)]  # (d_in, d_sae, batch)
QUICK_SHAPES = [(64, 256, 512)]
GPU_SHAPES = [(768, 24576, 4096)]


def roofline(d_in: int, d_sae: int, batch: int, device: str, dtype: torch.dtype):
    """The five dense products of a step of these shapes, as one function."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    x, g, gz, f = rand(batch, d_in), rand(batch, d_in), rand(batch, d_sae), rand(batch, d_sae)
    w_enc, w_dec = rand(d_in, d_sae), rand(d_sae, d_in)

    # outputs preallocated: the roofline is the products' arithmetic alone, with no allocation
    # or page faults (which the step pays, so the ratio is an honest fraction)
    outs = [torch.empty(*shape, device=device, dtype=dtype)
            for shape in ((batch, d_sae), (batch, d_in), (batch, d_sae), (d_sae, d_in), (d_in, d_sae))]

    def products():
        torch.mm(x, w_enc, out=outs[0])
        torch.mm(f, w_dec, out=outs[1])
        torch.mm(g, w_dec.T, out=outs[2])
        torch.mm(f.T, g, out=outs[3])
        torch.mm(x.T, gz, out=outs[4])
    return products


def saelab_step(arch: str, d_in: int, d_sae: int, x: torch.Tensor, **options):
    """One SAETrainer step of `arch` (not a logging step), as a function; `options` are
    TrainSpec fields (autocast, compile)."""
    from saelab.sae import SAE
    from saelab.train.spec import TrainSpec
    from saelab.train.trainer import SAETrainer

    knob = {"coefficient": 1.0} if arch in ("relu", "jumprelu") else {"k": K}
    spec = TrainSpec(arch=arch, d_sae=d_sae, **knob, **options)
    sae = SAE.from_config(spec.sae_config(d_in)).to(x.device)
    trainer = SAETrainer(spec, sae, 10**9, torch.Generator().manual_seed(0))
    step = iter(range(10**9))
    return lambda: trainer.update(next(step), x, x, log=False)


def saelens_available() -> bool:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return False
    return True


def saelens_step(arch: str, d_in: int, d_sae: int, x: torch.Tensor, bf16: bool = False):
    """SAELens's training step (its SAETrainer._train_step without the schedulers) on x, under
    bf16 autocast as its trainer's `autocast` option does where `bf16`."""
    from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE,
                               JumpReLUTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig,
                               TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    made = {
        "relu": lambda: (StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1.0)), {"l1": 1.0}),
        "topk": lambda: (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=K)), {}),
        "batchtopk": lambda: (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=K)), {}),
        "jumprelu": lambda: (JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=1.0)), {"l0": 1.0}),
    }
    sae, coefficients = made[arch]()
    sae = sae.to(x.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(d_sae, device=x.device)

    def step():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            out = sae.training_forward_pass(TrainStepInput(x, coefficients, since_fired > 10**6, 10**6, False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().float().sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return step


def peer_in_child(arch: str, d_in: int, d_sae: int, batch: int, repeats: int, device: str,
                  bf16: bool) -> tuple[float, float | None]:
    """SAELens's best step time and peak MiB, measured in a fresh process: saelab's CPU trainers
    change the process's heap settings (saelab.train.host_memory), which SAELens's own runs do not
    have, so timing it beside them would flatter it."""
    code = (f"import json, torch; torch.set_num_threads({torch.get_num_threads()})\n"
            "from bench import PeakMemory, best_times\n"
            "from bench.train_throughput import saelens_step\n"
            f"x = torch.randn({batch}, {d_in}, generator=torch.Generator().manual_seed(0)).to({device!r})\n"
            f"with PeakMemory({device!r}) as mem:\n"
            f"    step = saelens_step({arch!r}, {d_in}, {d_sae}, x, {bf16})\n"
            "    step()\n"
            f"print(json.dumps([best_times({{'s': step}}, {repeats}, {device!r})['s'], mem.mib]))\n")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root)
    seconds, mib = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, mib


def measure_shape(d_in: int, d_sae: int, batch: int, repeats: int, device: str = "cpu",
                  options: dict | None = None, peers: bool = True, archs: tuple = ARCHS) -> list[dict]:
    """Rows for every architecture at one shape: saelab against the roofline (interleaved) and
    SAELens (in its own process, `peer_in_child`)."""
    options = options or {}
    bf16 = options.get("autocast") == "bf16"
    roof = roofline(d_in, d_sae, batch, device, torch.bfloat16 if bf16 else torch.float32)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    have_peer = peers and saelens_available()
    shape = f"d_in {d_in} d_sae {d_sae} batch {batch}" + (", bf16 autocast" if bf16 else "") + \
        (", compiled" if options.get("compile") else "")
    rows = []
    for arch in archs:
        fns = {"roofline": roof}
        with PeakMemory(device) as mine:
            fns["saelab"] = saelab_step(arch, d_in, d_sae, x, **options)
            fns["saelab"]()
        t = best_times(fns, repeats, device)
        fns.clear()
        if have_peer:
            t["SAELens"], theirs = peer_in_child(arch, d_in, d_sae, batch, repeats, device, bf16)
        tok = batch / t["saelab"]
        rows.append(row(f"train {arch}, {shape}", tok, "tokens/s (ratio: fraction of the roofline)",
                        f"roofline: 5 dense products ({'bf16' if bf16 else 'fp32'} products)", batch / t["roofline"],
                        peak_mib=mine.mib, note=f"best of {repeats}, interleaved"))
        if have_peer:
            rows.append(row(f"train {arch} vs SAELens, {shape}", tok, "tokens/s (ratio: speed-up over SAELens)",
                            "SAELens training step", batch / t["SAELens"], peak_mib=mine.mib,
                            note="SAELens in its own process (glibc's default heap, as its users run it)"
                                 + (f"; its peak {theirs:.0f} MiB" if theirs is not None else "")))
        elif peers:
            rows.append(row(f"train {arch} vs SAELens, {shape}", tok, "tokens/s",
                            "SAELens training step: absent (pip install sae-lens)", peak_mib=mine.mib))
    return rows


def rows(quick: bool) -> list[dict]:
    shapes, repeats = (QUICK_SHAPES, 1) if quick else (SHAPES, 3)
    return [r for shape in shapes for r in measure_shape(*shape, repeats)]


def gpu_rows(quick: bool = False, device: str = "cuda") -> list[dict]:
    """The GPU path: bf16 autocast (fp32 master weights) with and without torch.compile, against
    the bf16 roofline, at d_in 768, d_sae 24576, batch 4096 (SAELens under bf16 autocast too).
    `device` "cpu" runs the same code as a dry run (it checks the path, it measures nothing)."""
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    out = []
    for shape in shapes:
        out += measure_shape(*shape, 2 if quick else 10, device, {"autocast": "bf16", "compile": True})
        out += measure_shape(*shape, 2 if quick else 10, device, {"autocast": "bf16"}, peers=False, archs=("relu",))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    from bench.__main__ import print_table

    print_table(gpu_rows(args.quick) if args.gpu else rows(args.quick))


if __name__ == "__main__":
    main()
