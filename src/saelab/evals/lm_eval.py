"""Evaluate SAEs on a language model: reconstruction and sparsity on held-out activations, and
what splicing them in does to the model's predictions — one metrics.json entry per SAE.

Activations are read live with one early-stopping forward pass per batch for all hooks the
SAEs need; downstream metrics come from `saelab.evals.downstream` (shared clean/ablation passes).
Metric definitions live in `saelab.evals.metrics` and `saelab.evals.downstream`, nowhere else."""

from __future__ import annotations

from typing import Sequence

import torch

from saelab.evals.downstream import evaluate_downstream, token_batches
from saelab.lm.resolve import check_sae_fits
from saelab.lm.hooked import HookedLM
from saelab.evals.metrics import MetricsAccumulator
from saelab.sae import SAE


@torch.no_grad()
def reconstruction_metrics(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
                           exclude_bos: bool = True, dense_threshold: float = 0.1,
                           include_density: bool = False) -> list[dict]:
    """mse, fvu, cos, l0, l1, density histogram, dead/dense per SAE, over every (non-BOS)
    position; with `include_density`, each feature's density as a list under "density"."""
    hooks = [check_sae_fits(lm, sae) for sae in saes]
    names = list(dict.fromkeys(h for pair in hooks for h in pair))
    accs = [MetricsAccumulator(dense_threshold=dense_threshold) for _ in saes]
    for batch in token_batches(tokens, batch_size):
        cache = lm.run_with_cache(batch, names)
        acts = {h: (a[:, 1:] if exclude_bos else a).reshape(-1, a.shape[-1]).float() for h, a in cache.items()}
        for sae, (h_in, h_out), acc in zip(saes, hooks, accs):
            f = sae.encode(acts[h_in].to(sae.W_enc.device))
            acc.update(acts[h_out].to(sae.W_enc.device), sae.decode(f), f)
    return [acc.result().to_dict(include_density=include_density) for acc in accs]


def evaluate_on_lm(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
                   exclude_bos: bool = True, downstream: bool = True) -> list[dict]:
    """Reconstruction metrics merged with downstream ones (loss recovered, KL), per SAE."""
    for sae in saes:
        sae.eval()
    entries = reconstruction_metrics(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos)
    if downstream:
        for entry, extra in zip(entries, evaluate_downstream(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos)):
            entry.update(extra)
    return entries
