"""Evaluate several SAEs on the same held-out batches in one pass (reconstruction and sparsity).

Downstream metrics that need the language model (loss recovered, KL) live in `downstream.py`;
this module only needs activations, so it serves toy data and cached activations alike."""

from __future__ import annotations

from typing import Iterable

import torch

from saelab.evals.metrics import MetricsAccumulator
from saelab.sae import SAE


@torch.no_grad()
def evaluate_saes(saes: list[SAE], batches: Iterable, dense_threshold: float = 0.1) -> list[dict]:
    """metrics.json entries, one per SAE. Batches are x (N, d_in) or (x, y) pairs (transcoders)."""
    accs = [MetricsAccumulator(dense_threshold=dense_threshold) for _ in saes]
    for sae in saes:
        sae.eval()
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, batch)
        for sae, acc in zip(saes, accs):
            dev = sae.W_enc.device
            f = sae.encode(x.to(dev).float())
            acc.update(y.to(dev).float(), sae.decode(f), f)
    return [acc.result().to_dict() for acc in accs]
