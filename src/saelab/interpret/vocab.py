"""Token strings and which token ids to show, shared by the logit lens and embedding lists.

Two kinds of ids make lists of tokens misleading: ids the tokenizer never produces (rows past
the tokenizer's vocabulary that models pad their embedding to, as Pythia does, or tokens absent
from the corpus: training never moved them), and tokens whose unembedding column has an outlier
norm (often the same never-trained tokens), which top every list by norm alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.data.corpus import token_contexts
from saelab.errors import DataError

MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation, for normal data


def token_strings(tokenizer, n: int) -> list[str]:
    """Raw text of each id 0..n-1 (ids past the tokenizer's vocabulary give "<id N>")."""
    size = len(tokenizer) if tokenizer is not None else 0
    out = tokenizer.batch_decode([[i] for i in range(min(n, size))]) if size else []
    return out + [f"<id {i}>" for i in range(len(out), n)]


def used_token_ids(contexts: Tensor, n: int) -> Tensor:
    """(n,) bool: which ids occur in a token array (e.g. the training corpus's contexts)."""
    ids = torch.as_tensor(contexts).flatten().long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f"token ids must be in 0..{n - 1}, got {int(ids.min())}..{int(ids.max())}")
    return torch.bincount(ids, minlength=n) > 0


def high_norm_tokens(W: Tensor, z: float) -> Tensor:
    """(n_tokens,) bool: columns of W (d, n_tokens) whose norm has a robust z-score above `z`,
    (norm - median) / (1.4826 * MAD): an outlier test that the outliers cannot mask."""
    norms = W.detach().float().norm(dim=0)
    median = norms.median()
    mad = (norms - median).abs().median().clamp_min(1e-12)
    return (norms - median) / (MAD_TO_STD * mad) > z


def vocab_mask(n: int, *, tokenizer_size: int | None = None, used: Tensor | None = None,
               W: Tensor | None = None, high_norm_z: float | None = None) -> Tensor:
    """(n,) bool of ids to keep: below `tokenizer_size`, in `used` (bool (n,)) if given, and
    not a high-norm outlier of W (d, n) if `high_norm_z` is given."""
    keep = torch.ones(n, dtype=torch.bool)
    if tokenizer_size is not None:
        keep[tokenizer_size:] = False
    if used is not None:
        used = torch.as_tensor(used, dtype=torch.bool).cpu()
        if used.shape != (n,):
            raise DataError(f"the used-token mask must have shape ({n},), got {tuple(used.shape)}")
        keep &= used
    if high_norm_z is not None:
        if W is None:
            raise DataError("dropping high-norm tokens needs the weight matrix W")
        keep &= ~high_norm_tokens(W, high_norm_z).cpu()
    if not bool(keep.any()):
        raise DataError("no token ids left after dropping unused and high-norm tokens")
    return keep


def token_mask(lm, n: int, W: Tensor, *, drop_unused: str | None = None,
               high_norm_z: float | None = None) -> Tensor:
    """(n,) bool: ids of `lm` that may be listed, of the first n: inside the tokenizer, used in
    the text of `drop_unused` (a corpus source; its first 4096 contexts) if given, and not a
    high-norm outlier of W (d, n) if `high_norm_z` is given."""
    used = None
    if drop_unused:
        contexts = token_contexts(drop_unused, lm.tokenizer, min(128, lm.context_length),
                                  split="all", max_contexts=4096)
        used = used_token_ids(contexts, n)
    return vocab_mask(n, tokenizer_size=len(lm.tokenizer), used=used, W=W, high_norm_z=high_norm_z)
