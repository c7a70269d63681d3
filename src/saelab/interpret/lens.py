"""Logit lens on SAE features: what each decoder direction does to the next-token logits.

A feature writes `f * W_dec[i]` into the stream it reconstructs. Its direct effect on the
logits goes through the final norm and the unembedding. For a direction d added to a residual
x, a LayerNorm gives gamma * (d - mean(d)) / sigma(x) (+ terms along x that do not depend on the
token), an RMSNorm gamma * d / rms(x). The per-token scale 1/sigma(x) is positive and common to
all tokens, so it changes neither the ranking of tokens nor the skew / kurtosis below; the rest
is linear in d. So the lens folds the norm's LINEAR part (centering for LayerNorm, the gain
gamma) and drops its scale and bias:

    logit_weights[i] = (gamma * centre(W_dec[i])) @ W_U        (d_sae, d_vocab)

(`fold_norm=False`: W_dec[i] @ W_U, the raw product.) Calling the norm on d itself would be
wrong: it divides by d's own size and adds beta, which swamps a unit vector.

Decoder rows in MLP-neuron space (an SAE on `blocks.L.mlp.hook_post`) reach the residual stream
through W_out first; other points that are not d_model wide have no direct path to the logits.

Kinds, from the distribution of a feature's logit weights over the vocabulary (kurtosis is the
plain fourth standardised moment: 3 for a normal distribution):

* prediction:  kurtosis >= 6 and skew >= 0.5   (a few tokens pushed far up)
* suppression: kurtosis >= 6 and skew <= -0.5  (a few tokens pushed far down)
* partition:   kurtosis <= 2.5                 (two large groups of tokens split apart: a 50/50
                                                 two-level split has kurtosis 1, 25/75 2.33)
* other:       everything else (including near-normal weights, kurtosis ~3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.lm.hook_names import parse_hook

PREDICTION_KURTOSIS = 6.0
SKEW_THRESHOLD = 0.5
PARTITION_KURTOSIS = 2.5


def residual_directions(sae, lm) -> Tensor:
    """(d_sae, d_model): each feature's decoder row as a direction in the residual stream."""
    W = sae.W_dec.detach()
    out_hook = sae.cfg.hook_name_out or sae.cfg.hook_name or ""
    if out_hook.endswith("mlp.hook_post") and W.shape[1] == lm.d_mlp:
        return W @ lm.mlp_weights(parse_hook(out_hook).layer).W_out.detach().to(W.dtype)
    if W.shape[1] == lm.d_model and not out_hook.endswith(("mlp.hook_pre", "mlp.hook_pre_linear")):
        return W
    raise ConfigError(f"the decoder writes to {out_hook or 'an unnamed hook'} ({W.shape[1]} "
                      f"wide), which has no direct path to the logits; the logit lens needs a "
                      f"d_model ({lm.d_model}) output or blocks.L.mlp.hook_post")


def fold_final_norm(directions: Tensor, norm: nn.Module) -> Tensor:
    """The final norm's linear part applied to directions (..., d): centre (LayerNorm only),
    then multiply by the gain. See the module docstring for why not call the norm."""
    if _centres(norm):
        directions = directions - directions.mean(-1, keepdim=True)
    gain = getattr(norm, "weight", None)
    return directions * gain.detach().to(directions.dtype) if gain is not None else directions


def _centres(norm: nn.Module) -> bool:
    name = type(norm).__name__.lower()
    return isinstance(norm, nn.LayerNorm) or ("layernorm" in name and "rms" not in name)


def logit_weights(directions: Tensor, lm, fold_norm: bool = True) -> Tensor:
    """(n, d_vocab) direct logit effect of residual directions (n, d_model)."""
    d = directions.to(lm.W_U.device, lm.W_U.dtype)
    return (fold_final_norm(d, lm.final_norm) if fold_norm else d) @ lm.W_U.detach()


def moments(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Skew and kurtosis (4th standardised moment) of each row of x (n, V) over `mask` (V,).
    Rows with zero variance get 0 and 0."""
    x = x.double()
    if mask is not None:
        x = x[:, mask.to(x.device)]
    c = x - x.mean(1, keepdim=True)
    var = c.pow(2).mean(1)
    ok = var > (1e-12 * x.abs().amax(1)).pow(2)  # constant rows: rounding noise, not a shape
    var = torch.where(ok, var, 1.0)
    skew = torch.where(ok, c.pow(3).mean(1) / var.pow(1.5), 0.0)
    kurt = torch.where(ok, c.pow(4).mean(1) / var.pow(2), 0.0)
    return skew, kurt


def classify(skew: float, kurtosis: float) -> str:
    """prediction / suppression / partition / other, by the thresholds in the module docstring."""
    if kurtosis >= PREDICTION_KURTOSIS and skew >= SKEW_THRESHOLD:
        return "prediction"
    if kurtosis >= PREDICTION_KURTOSIS and skew <= -SKEW_THRESHOLD:
        return "suppression"
    if 0 < kurtosis <= PARTITION_KURTOSIS:
        return "partition"
    return "other"


@dataclass
class LensResult:
    """Per requested feature (n of them): top / bottom token ids and logit weights, (n, k)."""

    features: Tensor
    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor
    skew: Tensor
    kurtosis: Tensor
    # histogram of each feature's logit weights over the ranked ids: (n, bins) counts over
    # `bins` equal bins from the feature's lowest weight to its highest, (n, 2)
    hist_counts: Tensor | None = None
    hist_range: Tensor | None = None

    def hist_edges(self, i: int) -> list[float]:
        """The bin edges of row i's histogram."""
        lo, hi = self.hist_range[i].tolist()
        bins = self.hist_counts.shape[1]
        return [lo + (hi - lo) * b / bins for b in range(bins + 1)]

    def kinds(self) -> list[str]:
        return [classify(s, k) for s, k in zip(self.skew.tolist(), self.kurtosis.tolist())]


@torch.no_grad()
def feature_lens(sae, lm, features=None, *, k: int = 10, mask: Tensor | None = None,
                 fold_norm: bool = True, chunk: int = 256, bins: int = 40) -> LensResult:
    """Logit lens for `features` (default all), `chunk` features at a time so that the
    (chunk, d_vocab) product is all that is ever held. `mask` (d_vocab,) bool: ids to rank (and
    to histogram: `bins` bins per feature, `weight_histogram`)."""
    d_sae = sae.cfg.d_sae
    feats = torch.arange(d_sae) if features is None else torch.as_tensor(features).long().flatten()
    if feats.numel() and (feats.min() < 0 or feats.max() >= d_sae):
        raise ConfigError(f"feature index out of range: valid 0..{d_sae - 1}, got {feats.tolist()}")
    dirs = residual_directions(sae, lm)
    keep = torch.ones(lm.d_vocab, dtype=torch.bool) if mask is None else mask.cpu()
    ids = torch.nonzero(keep).flatten()
    k = min(k, ids.numel())
    parts: list[list[Tensor]] = [[] for _ in range(8)]
    for start in range(0, feats.numel(), chunk):
        w = logit_weights(dirs[feats[start:start + chunk].to(dirs.device)], lm, fold_norm)
        w = w[:, ids.to(w.device)].float().cpu()
        top, bottom = w.topk(k, dim=1), w.topk(k, dim=1, largest=False)
        skew, kurt = moments(w)
        counts, span = weight_histogram(w, bins)
        for part, t in zip(parts, (ids[top.indices], top.values, ids[bottom.indices],
                                   bottom.values, skew, kurt, counts, span)):
            part.append(t)
    cat = [torch.cat(p) if p else torch.zeros(0) for p in parts]
    return LensResult(feats, *cat)


def weight_histogram(w: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Per row of w (n, V): counts (n, bins) int64 over `bins` equal bins spanning the row's
    [min, max] (the max in the last bin; a constant row all in the first), and (n, 2) (min, max)."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    width = (hi - lo) / bins
    idx = torch.where(width > 0, (w - lo) / torch.where(width > 0, width, 1.0), 0.0).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(w.shape[0], bins, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))
    return counts, torch.cat([lo, hi], 1)
