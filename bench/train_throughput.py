"""Training throughput of one SAE step on CPU, against the roofline of its matrix products and,
where sae-lens is importable, against SAELens's own training step on the same shapes.

Roofline: the five dense products a dense SAE step must do — x @ W_enc, f @ W_dec, and in the
backward pass g @ W_dec^T, f^T @ g, x^T @ g_z — timed alone. saelab's fraction of it is
roofline time / saelab step time. Run: `python bench/train_throughput.py [--threads N]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from saelab.sae import SAE
from saelab.train.trainer import SAETrainer
from saelab.train.spec import TrainSpec


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def roofline(d_in: int, d_sae: int, batch: int, repeats: int) -> float:
    x, g = torch.randn(batch, d_in), torch.randn(batch, d_in)
    w_enc, w_dec = torch.randn(d_in, d_sae), torch.randn(d_sae, d_in)
    f, gz = torch.randn(batch, d_sae), torch.randn(batch, d_sae)

    def products():
        x @ w_enc
        f @ w_dec
        g @ w_dec.T
        f.T @ g
        x.T @ gz

    return best_time(products, repeats)


def saelab_step(arch: str, d_in: int, d_sae: int, batch: int, k: int, repeats: int) -> float:
    spec = TrainSpec(arch=arch, d_sae=d_sae, k=k if arch != "relu" else None, coefficient=1.0 if arch == "relu" else 0.0)
    sae = SAE.from_config(spec.sae_config(d_in))
    trainer = SAETrainer(spec, sae, 10_000, torch.Generator().manual_seed(0))
    x = torch.randn(batch, d_in)
    step = iter(range(10_000))
    # a plain step; logging steps (1 in 10 by default) also count active features for L0
    return best_time(lambda: trainer.update(next(step), x, x, log=False), repeats)


def saelens_step(arch: str, d_in: int, d_sae: int, batch: int, k: int, repeats: int) -> float | None:
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1.0))
        coefficients = {"l1": 1.0}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        coefficients = {}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 10_000, False))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return best_time(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.d_in, args.d_sae, args.batch)
    roof = roofline(*shape, args.repeats)
    print(f"shapes d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} k={args.k}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"roofline (5 dense products alone): {roof * 1e3:8.1f} ms/step  {args.batch / roof:10.0f} tok/s")
    print(f"{'arch':<6}{'saelab ms':>11}{'tok/s':>10}{'of roofline':>13}{'SAELens ms':>12}{'tok/s':>10}{'speed-up':>10}")
    for arch in ("relu", "topk"):
        ours = saelab_step(arch, *shape, args.k, args.repeats)
        theirs = saelens_step(arch, *shape, args.k, args.repeats)
        peer = f"{theirs * 1e3:>12.1f}{args.batch / theirs:>10.0f}{theirs / ours:>9.2f}x" if theirs else f"{'(sae-lens not installed)':>32}"
        print(f"{arch:<6}{ours * 1e3:>11.1f}{args.batch / ours:>10.0f}{roof / ours:>12.0%}{peer}")


if __name__ == "__main__":
    main()
