"""What the language model's next-token predictions do when an activation is replaced.

Definitions (nats; "token" = a position t whose next token t+1 is predicted, so a context of
`seq` tokens gives `seq - 1` of them; with `exclude_bos` the prediction made at position 0 is
left out of every average):

    CE            mean over tokens of -log q(x_{t+1} | x_<=t) under the spliced model
    kl            mean over tokens of KL(clean || spliced) = sum_v p_v (log p_v - log q_v)
    loss_recovered       = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    loss_recovered_mean  = (CE_mean - CE_sae) / (CE_mean - CE_clean)

where `zero` replaces the activation with 0 and `mean` with its mean over the evaluation
tokens (BOS excluded from the mean when `exclude_bos`). With `exclude_bos` every splice also
leaves the activation at position 0 untouched: SAEs are usually trained without the BOS
token, whose activations are outliers, and replacing it would change every later position.

Everything is built on `compare_splices`: one clean pass per batch, then one pass per
variant (a mapping hook -> splice), so many SAEs, ablations and perturbations share the clean
pass. A transcoder (sparse MLP) reads `cfg.hook_name` and replaces `cfg.hook_name_out`: its
splice records the input in the same pass and swaps the output when the model reaches it.
Per-token CE is `saelab.lm.hooked.next_token_logprobs` / `next_token_nll` (defined once, there);
`evaluate_downstream` returns one typed `DownstreamMetrics` (saelab.evals.entry) per SAE.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from saelab.data.cache.shuffle import hook_rows
from saelab.errors import ConfigError, DataError
from saelab.evals.entry import Ablation, DownstreamMetrics
from saelab.lm.hooked import HookedLM, Splice, next_token_logprobs, next_token_nll
from saelab.lm.resolve import check_sae_fits
from saelab.progress import progress_bar
from saelab.sae import SAE

Splices = Mapping[str, Splice]
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (act, x_hat) -> new act
ABLATIONS = ("zero", "mean")


# ---- per-token quantities (CE itself: saelab.lm.hooked.next_token_logprobs / next_token_nll) --
def _kl(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) -> (...,). In float32 a per-token KL below
    ~1e-6 is at the rounding level of the log-softmax; pass float64 logits for such cases."""
    return (p * (logp - logq)).sum(-1)


def keep_bos(fn: Splice) -> Splice:
    """Wrap a splice so the activation at position 0 (BOS) stays what the model computed."""
    def spliced(act: torch.Tensor) -> torch.Tensor:
        new = fn(act)
        if new is act or act.shape[1] < 1:
            return new
        return torch.cat([act[:, :1], new[:, 1:]], dim=1)
    return spliced


def token_batches(tokens, batch_size: int = 16) -> list[torch.Tensor]:
    """A (n, seq) token tensor cut into batches, or an iterable of (b, seq) batches as a list."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise DataError(f"tokens must be a non-empty (n_contexts, seq) tensor, got shape {tuple(tokens.shape)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        return list(tokens.split(batch_size))
    batches = [torch.as_tensor(b) for b in tokens]
    if not batches:
        raise DataError("no token batches to evaluate on")
    return batches


# ---- the shared engine ----------------------------------------------------------------------
@torch.no_grad()
def compare_splices(lm: HookedLM, tokens, variants: Mapping[str, Splices], *,
                    batch_size: int = 16, exclude_bos: bool = False,
                    progress: bool | None = None) -> dict[str, dict]:
    """CE and KL(clean || variant) for each named variant, sharing one clean pass per batch.

    tokens: (n, seq) tensor or iterable of (b, seq) batches. Returns {"clean": {"ce",
    "n_tokens"}, name: {"ce", "kl", "n_tokens"} for each variant} (floats, nats)."""
    batches = token_batches(tokens, batch_size)
    wrap = keep_bos if exclude_bos else (lambda fn: fn)
    wrapped = {name: {h: wrap(fn) for h, fn in sp.items()} for name, sp in variants.items()}
    sums = {name: [0.0, 0.0] for name in ["clean", *wrapped]}  # ce_sum, kl_sum (float64)
    n = 0
    start = 1 if exclude_bos else 0
    for batch in progress_bar(batches, desc="downstream", unit="batch", enabled=progress):
        if batch.dim() != 2 or batch.shape[1] < 2 + start:
            raise DataError(f"token batches must be (b, seq) with seq >= {2 + start}, got shape {tuple(batch.shape)}")
        logp_clean = next_token_logprobs(lm.forward(batch), start)  # forward validates ids and length
        p_clean = logp_clean.exp()
        nll = next_token_nll(logp_clean, batch, start)
        sums["clean"][0] += nll.double().sum().item()
        n += nll.numel()
        for name, splices in wrapped.items():
            logq = next_token_logprobs(lm.forward(batch, splices), start)
            sums[name][0] += next_token_nll(logq, batch, start).double().sum().item()
            sums[name][1] += _kl(p_clean, logp_clean, logq).double().sum().item()
    out = {"clean": {"ce": sums["clean"][0] / n, "n_tokens": n}}
    for name in wrapped:
        out[name] = {"ce": sums[name][0] / n, "kl": sums[name][1] / n, "n_tokens": n}
    return out


def splice_loss(lm: HookedLM, tokens, hook: str, fn: Splice, *, batch_size: int = 16,
                exclude_bos: bool = False, progress: bool | None = None) -> dict:
    """What one splice does: {"ce", "ce_clean", "kl", "n_tokens"} with `fn` applied at `hook`
    (CE of the spliced and the clean LM, KL(clean || spliced)). A one-call convenience over
    `compare_splices` for a quick check of a single edit from a notebook (an ablation, a
    steering vector); the pipelines call `compare_splices` or `evaluate_downstream`, which
    share the clean pass between many variants."""
    res = compare_splices(lm, tokens, {"x": {hook: fn}}, batch_size=batch_size,
                          exclude_bos=exclude_bos, progress=progress)
    return {**res["x"], "ce_clean": res["clean"]["ce"]}


# ---- SAE splices and ablations --------------------------------------------------------------
def sae_splices(lm: HookedLM, sae: SAE, combine: Combine | None = None,
                hook: str | None = None) -> dict[str, Splice]:
    """Splices that replace the SAE's output hook by combine(act, x_hat) (default: x_hat).

    x_hat = sae(input activation), computed on the SAE's device and dtype and moved back. For a
    transcoder the input is recorded at hook_name earlier in the same pass."""
    hook_in, hook_out = check_sae_fits(lm, sae, hook)
    combine = combine or (lambda act, x_hat: x_hat)
    sae.eval()  # inference semantics (batchtopk: its threshold, not the batch's top k*N)
    device, dtype = sae.W_enc.device, sae.W_enc.dtype

    def predict(x: torch.Tensor) -> torch.Tensor:
        return sae(x.to(device, dtype)).to(x.device, x.dtype)

    if hook_in == hook_out:
        return {hook_in: lambda act: combine(act, predict(act))}
    seen: list[torch.Tensor] = []

    def record(act: torch.Tensor) -> torch.Tensor:
        seen[:] = [act]
        return act

    return {hook_in: record, hook_out: lambda act: combine(act, predict(seen[0]))}


def ablation_splice(kind: str, mean: torch.Tensor | None = None) -> Splice:
    """Zero ablation, or mean ablation with `mean` (d,) broadcast over every position."""
    if kind == "zero":
        return torch.zeros_like
    if kind == "mean":
        if mean is None:
            raise ConfigError("mean ablation needs the activation mean")
        return lambda act: mean.to(act).expand_as(act).clone()
    raise ConfigError(f"unknown ablation {kind!r}; valid: {', '.join(ABLATIONS)}")


@torch.no_grad()
def hook_means(lm: HookedLM, tokens, hooks: Sequence[str], *, batch_size: int = 16,
               exclude_bos: bool = False) -> dict[str, torch.Tensor]:
    """Mean activation (d,) at each hook over all positions of `tokens` (position 0 left out
    with `exclude_bos`), from one early-stopping pass per batch; float64 sums."""
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        return {}
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in token_batches(tokens, batch_size):
        rows = hook_rows(lm, batch, hooks, drop_bos=exclude_bos)
        for h in hooks:
            s = rows[h].double().sum(0)
            sums[h] = sums[h] + s if h in sums else s
        n += rows[hooks[0]].shape[0]
    if n == 0:
        raise DataError("no positions to average over (contexts of one token with exclude_bos?)")
    return {h: (s / n).to(lm.W_E.dtype) for h, s in sums.items()}


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); NaN when ablation changes nothing."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else math.nan


def evaluate_downstream(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
                        exclude_bos: bool = False, ablations: Sequence[str] = ABLATIONS,
                        means: Mapping[str, torch.Tensor] | None = None,
                        progress: bool | None = None) -> list[DownstreamMetrics]:
    """Loss recovered, CE and KL for several SAEs at once: one `DownstreamMetrics` per SAE
    (CE of the clean and the spliced LM, KL, and an `Ablation` per kind in `ablations`).
    Clean and ablation passes are shared by SAEs replacing the same hook. `means`
    ({hook: (d,)}) skips the pass that computes them."""
    batches = token_batches(tokens, batch_size)
    for kind in ablations:
        ablation_splice(kind, torch.zeros(1))  # validates the name
    hooks = [check_sae_fits(lm, sae) for sae in saes]
    targets = list(dict.fromkeys(out for _, out in hooks))
    means = dict(means or {})
    if "mean" in ablations and any(t not in means for t in targets):
        missing = [t for t in targets if t not in means]
        means.update(hook_means(lm, batches, missing, exclude_bos=exclude_bos))
    variants: dict[str, Splices] = {}
    for t in targets:
        for kind in ablations:
            variants[f"{kind}@{t}"] = {t: ablation_splice(kind, means.get(t))}
    for i, sae in enumerate(saes):
        variants[f"sae{i}"] = sae_splices(lm, sae)
    res = compare_splices(lm, batches, variants, exclude_bos=exclude_bos, progress=progress)
    return [_sae_entry(res, i, target, ablations, exclude_bos)
            for i, (_, target) in enumerate(hooks)]


def _sae_entry(res: dict, i: int, target: str, ablations: Sequence[str], exclude_bos: bool) -> DownstreamMetrics:
    clean, spliced = res["clean"]["ce"], res[f"sae{i}"]
    per_kind = {}
    for kind in ablations:
        ab = res[f"{kind}@{target}"]
        per_kind[kind] = Ablation(ab["ce"], ab["kl"], loss_recovered(clean, spliced["ce"], ab["ce"]))
    return DownstreamMetrics(clean, spliced["ce"], spliced["kl"], per_kind, spliced["n_tokens"], exclude_bos, target)
