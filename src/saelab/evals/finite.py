"""Refuse activations holding NaN or Inf, saying where they came from.

A single non-finite value turns every metric it touches into NaN (or a silently wrong
density), so evaluation and the feature scan stop at the first batch holding one, naming the
hook and the (context, position) of the first such row."""

from __future__ import annotations

from typing import Callable

import torch

from saelab.errors import DataError


def refuse_nonfinite(x: torch.Tensor, hook: str | None, where: Callable[[int], str]) -> None:
    """Raise DataError if x (..., d) holds NaN or Inf: `where(i)` describes flat row i (e.g.
    "context 3, position 17"); `hook` names the activations (None: the SAE's input)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    rows = bad.reshape(-1, x.shape[-1]).any(-1)
    first = int(rows.nonzero()[0])
    n_nan = int(torch.isnan(x).sum())
    raise DataError(
        f"activations at {hook or 'the SAE input'} hold NaN or Inf ({n_nan} NaN, {int(bad.sum()) - n_nan} Inf in "
        f"{int(rows.sum())} of {rows.numel()} rows of this batch), the first at {where(first)}; refusing to evaluate "
        "on them. Run the model in float32 (--dtype float32) or rebuild the activation cache")
