"""Evaluate several SAEs on the same data in one pass: reconstruction and sparsity from any
activation batches, plus what splicing them into a language model does.

`evaluate_saes(saes, batches)` is the one evaluation loop. A batch is

    x (N, d_in)      every SAE reads x and reconstructs it
    (x, y)           every SAE reads x and predicts y (transcoders)
    PerSAE(...)      one x or (x, y) per SAE, for SAEs that read different hooks

so toy data, cached activations and a live LM go through the same code. `lm_batches` is the
live-LM adapter: one early-stopping LM pass per token batch for every hook the SAEs need,
yielding each SAE's rows (BOS position dropped with `exclude_bos`). `evaluate_on_lm` adds the
downstream metrics of `saelab.evals.downstream` (shared clean and ablation passes). Metric
definitions live in `saelab.evals.metrics` and `saelab.evals.downstream`, nowhere else.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import torch

from saelab.data.cache.shuffle import as_pair, hook_rows
from saelab.errors import DataError
from saelab.evals.downstream import evaluate_downstream, token_batches
from saelab.evals.entry import DownstreamMetrics
from saelab.evals.metrics import DENSE_THRESHOLD, MetricsAccumulator, SAEMetrics
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits
from saelab.sae import SAE


class PerSAE(tuple):
    """A batch holding one x or (x, y) per SAE, in the order of the SAEs being evaluated."""


class Evaluation(NamedTuple):
    """One SAE's evaluation on an LM: reconstruction and sparsity, and the downstream metrics
    (None when they were not asked for)."""

    recon: SAEMetrics
    downstream: DownstreamMetrics | None


@torch.no_grad()
def evaluate_saes(saes: Sequence[SAE], batches: Iterable,
                  dense_threshold: float = DENSE_THRESHOLD) -> list[SAEMetrics]:
    """Reconstruction and sparsity metrics, one `SAEMetrics` per SAE, over every row of
    `batches` (see the module docstring for what a batch may be). SAEs run in eval mode on
    their own device; rows are compared in float32 against the SAE's target."""
    accs = [MetricsAccumulator(dense_threshold=dense_threshold) for _ in saes]
    for sae in saes:
        sae.eval()
    for batch in batches:
        for sae, acc, (x, y) in zip(saes, accs, _per_sae(batch, len(saes))):
            dev = sae.W_enc.device
            f = sae.encode(x.to(dev).float())
            acc.update(y.to(dev).float(), sae.decode(f), f)
    return [acc.result() for acc in accs]


def _per_sae(batch, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batch, PerSAE):
        if len(batch) != n:
            raise DataError(f"a PerSAE batch holds {len(batch)} parts for {n} SAEs; give one per SAE")
        return [as_pair(part) for part in batch]
    return [as_pair(batch)] * n


def lm_batches(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
               exclude_bos: bool = True) -> Iterator[PerSAE]:
    """PerSAE batches of each SAE's (input rows, target rows) from the LM on `tokens` ((n, seq)
    tensor or iterable of (b, seq) batches): one early-stopping pass per batch feeds every
    hook. The SAEs are checked against the model first (hook names, widths)."""
    hooks = [check_sae_fits(lm, sae) for sae in saes]
    names = list(dict.fromkeys(h for pair in hooks for h in pair))
    batches = token_batches(tokens, batch_size)

    def generate() -> Iterator[PerSAE]:
        for batch in batches:
            rows = hook_rows(lm, batch, names, drop_bos=exclude_bos)
            yield PerSAE((rows[h_in], rows[h_out]) for h_in, h_out in hooks)
    return generate()


def evaluate_on_lm(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
                   exclude_bos: bool = True, downstream: bool = True,
                   progress: bool | None = None) -> list[Evaluation]:
    """Reconstruction metrics over every (non-BOS) position of `tokens`, and with `downstream`
    loss recovered, CE and KL of each SAE spliced in: one `Evaluation` per SAE."""
    recon = evaluate_saes(saes, lm_batches(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos))
    if not downstream:
        return [Evaluation(r, None) for r in recon]
    down = evaluate_downstream(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos, progress=progress)
    return [Evaluation(r, d) for r, d in zip(recon, down)]
