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

Massive activations elsewhere are treated the same way in the SAE's splice: with an outlier
rule (saelab.data.outliers; the SAE's recorded one by default) the positions it flags in the
SAE's input keep the activation the model computed (`KeepFlagged`), and `outliers_kept` says
how many positions that was. So nobody is flattered by the exclusion, the splice with every
position replaced (BOS still excepted with `exclude_bos`) is reported beside it:

    ce_sae_all, kl_all, loss_recovered_all, loss_recovered_mean_all

Its pass is skipped on a batch where the rule flagged nothing (the two splices are the same
there), so a model without outliers pays nothing for it. Zero and mean ablations replace every
position: they set the scale.

Everything is built on `compare_splices`: one clean pass per batch, then one pass per
variant (a mapping hook -> splice), so many SAEs, ablations and perturbations share the clean
pass. A variant's pass starts at the block of its first splice, from the clean pass's residual
stream there (blocks before it are the clean ones), and stops at the final norm; the
unembedding and log-softmax run on chunks of positions, the clean log-probs once per batch. A transcoder (sparse MLP) reads `cfg.hook_name` and replaces `cfg.hook_name_out`: its
splice records the input in the same pass and swaps the output when the model reaches it.
Per-token CE is `saelab.lm.hooked.logprobs` / `target_nll` (defined once, there);
`evaluate_downstream` returns one typed `DownstreamMetrics` (saelab.evals.entry) per SAE.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch

from saelab.data.cache.shuffle import hook_rows
from saelab.data.outliers import OutlierRule, Rules
from saelab.data.provenance import rules_for
from saelab.errors import ConfigError, DataError
from saelab.evals.entry import Ablation, AllPositions, DownstreamMetrics
from saelab.lm.hooked import HookedLM, Splice, logprobs, target_nll
from saelab.lm.resolve import check_sae_fits
from saelab.progress import progress_bar
from saelab.sae import SAE

Splices = Mapping[str, Splice]
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (act, x_hat) -> new act
ABLATIONS = ("zero", "mean")


# ---- per-token quantities (CE itself: saelab.lm.hooked.logprobs / target_nll) -----------------
def _kl(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) -> (...,). In float32 a per-token KL below
    ~1e-6 is at the rounding level of the log-softmax; pass float64 logits for such cases."""
    return torch.linalg.vecdot(logp - logq, p)  # the sum of products, without their (..., vocab) tensor


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
class SameAs(NamedTuple):
    """Declares that a variant equals an earlier one (`base`) on any batch where `same()`,
    asked after the base's pass on that batch, says so: its pass is then skipped and the
    base's CE and KL of that batch counted for it."""

    base: str
    same: Callable[[], bool]


FINAL = "ln_final.hook_normalized"  # what the unembedding reads
CHUNK_BYTES = 64 * 2**20  # float32 log-probs of one chunk of positions


@torch.no_grad()
def compare_splices(lm: HookedLM, tokens, variants: Mapping[str, Splices], *,
                    batch_size: int = 16, exclude_bos: bool = False,
                    same_as: Mapping[str, SameAs] | None = None,
                    progress: bool | None = None) -> dict[str, dict]:
    """CE and KL(clean || variant) for each named variant, sharing one clean pass per batch.

    tokens: (n, seq) tensor or iterable of (b, seq) batches. `same_as`: variants that may reuse
    an earlier variant's pass batch by batch (`SameAs`). Returns {"clean": {"ce", "n_tokens"},
    name: {"ce", "kl", "n_tokens"} for each variant} (floats, nats).

    Per batch, the clean pass runs to the final norm and keeps the residual stream entering
    each block where a variant's first splice is (`HookedLM.first_layer`); each variant then
    resumes there (blocks before its splices are the clean ones) and stops at the final norm.
    The unembedding and log-softmax run in chunks of positions (`CleanLogprobs`): the clean
    log-probs once, each variant's once, never a (batch, seq, vocab) tensor per variant."""
    batches = token_batches(tokens, batch_size)
    same_as = dict(same_as or {})
    order = list(variants)
    if any(s.base not in order[:order.index(name)] for name, s in same_as.items()):
        raise ConfigError("a same_as variant must name an earlier variant as its base")
    wrap = keep_bos if exclude_bos else (lambda fn: fn)
    wrapped = {name: {h: wrap(fn) for h, fn in sp.items()} for name, sp in variants.items()}
    resume_at = {name: _resume_layer(lm, sp) for name, sp in wrapped.items()}
    keep = sorted({f"blocks.{layer}.hook_resid_pre" for layer in resume_at.values() if layer})
    sums = {name: [0.0, 0.0] for name in ["clean", *wrapped]}  # ce_sum, kl_sum (float64)
    n = 0
    start = 1 if exclude_bos else 0
    for batch in progress_bar(batches, desc="downstream", unit="batch", enabled=progress):
        if batch.dim() != 2 or batch.shape[1] < 2 + start:
            raise DataError(f"token batches must be (b, seq) with seq >= {2 + start}, got shape {tuple(batch.shape)}")
        acts = lm.run_with_cache(batch, [*keep, FINAL])  # validates ids and length
        clean = CleanLogprobs(lm, acts[FINAL], batch, start)
        sums["clean"][0] += clean.nll_sum
        n += clean.n_tokens
        this_batch: dict[str, tuple[float, float]] = {}
        for name, splices in wrapped.items():
            twin = same_as.get(name)
            if twin is not None and twin.same():
                this_batch[name] = this_batch[twin.base]
            else:
                layer = resume_at[name]
                resume = (layer, acts[f"blocks.{layer}.hook_resid_pre"]) if layer else None
                this_batch[name] = clean.compare(lm.run_with_cache(batch, [FINAL], splices=splices, resume=resume)[FINAL])
            sums[name][0] += this_batch[name][0]
            sums[name][1] += this_batch[name][1]
    out = {"clean": {"ce": sums["clean"][0] / n, "n_tokens": n}}
    for name in wrapped:
        out[name] = {"ce": sums[name][0] / n, "kl": sums[name][1] / n, "n_tokens": n}
    return out


def _resume_layer(lm: HookedLM, splices: Splices) -> int:
    """The block a variant's pass may resume at: its first splice's (0: run from the start;
    a splice at the final norm itself resumes at the last block)."""
    return min(lm.first_layer(list(splices)), lm.n_layers - 1) if splices else 0


class CleanLogprobs:
    """One batch's clean next-token log-probs and probabilities, float32 or wider, in chunks of
    positions (the only (tokens, vocab) tensors kept), and what a variant does against them.

    h: the final norm's output (b, seq, d) of the clean pass; positions start..seq-2 predict
    tokens start+1..seq-1. `compare(h_variant)` -> (CE sum, KL(clean || variant) sum) over
    those positions (float64 sums), unembedding and log-softmaxing one chunk at a time."""

    def __init__(self, lm: HookedLM, h: torch.Tensor, tokens: torch.Tensor, start: int):
        self.lm, self.start = lm, start
        self.targets = tokens[:, 1 + start:].reshape(-1).to(h.device)
        rows = max(1, CHUNK_BYTES // (4 * lm.d_vocab))
        self.slices = [slice(i, i + rows) for i in range(0, self.targets.shape[0], rows)]
        self.logp = list(self._chunks(h))
        self.p = [lp.exp() for lp in self.logp]  # kept beside the log-probs: no exp per variant
        self.n_tokens = self.targets.shape[0]
        self.nll_sum = sum(target_nll(lp, self.targets[sl]).double().sum().item()
                           for lp, sl in zip(self.logp, self.slices))

    def _chunks(self, h: torch.Tensor) -> Iterator[torch.Tensor]:
        """Log-probs of the predicting positions of h, chunk by chunk."""
        rows = h[:, self.start:-1].reshape(-1, h.shape[-1])
        return (logprobs(self.lm.unembed(rows[sl], apply_norm=False)) for sl in self.slices)

    def compare(self, h: torch.Tensor) -> tuple[float, float]:
        ce = kl = 0.0
        for logp, p, logq, sl in zip(self.logp, self.p, self._chunks(h), self.slices):
            ce += target_nll(logq, self.targets[sl]).double().sum().item()
            kl += _kl(p, logp, logq).double().sum().item()
        return ce, kl


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
class KeepFlagged:
    """Part of an SAE splice: the positions an outlier rule flags in the SAE's input keep the
    activation the model computed. Each batch's positions from `start` on are judged together
    (as `lm_batches` judges evaluation rows; `start` 1 when BOS is left out). Counts the
    positions kept: `total` over all batches, `last` in the latest one."""

    def __init__(self, rule: OutlierRule, start: int = 0):
        self.rule, self.start, self.total, self.last = rule, start, 0, 0

    def __call__(self, x_in: torch.Tensor, act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """x_in: the SAE's input (B, S, d_in); act, new: the replaced hook's activation and its
        replacement (B, S, d)."""
        flagged = self.rule.position_mask(x_in, self.start)
        self.last = int(flagged.sum())
        self.total += self.last
        return torch.where(flagged.unsqueeze(-1), act, new) if self.last else new


def sae_splices(lm: HookedLM, sae: SAE, combine: Combine | None = None,
                hook: str | None = None, keep: KeepFlagged | None = None) -> dict[str, Splice]:
    """Splices that replace the SAE's output hook by combine(act, x_hat) (default: x_hat),
    except at the positions `keep` flags (they keep the model's activation).

    x_hat = sae(input activation), computed on the SAE's device and dtype and moved back. For a
    transcoder the input is recorded at hook_name earlier in the same pass."""
    hook_in, hook_out = check_sae_fits(lm, sae, hook)
    combine = combine or (lambda act, x_hat: x_hat)
    sae.eval()  # inference semantics (batchtopk: its threshold, not the batch's top k*N)
    device, dtype = sae.W_enc.device, sae.W_enc.dtype

    def replace(x_in: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        new = combine(act, sae(x_in.to(device, dtype)).to(act.device, act.dtype))
        return new if keep is None else keep(x_in, act, new)

    if hook_in == hook_out:
        return {hook_in: lambda act: replace(act, act)}
    seen: list[torch.Tensor] = []

    def record(act: torch.Tensor) -> torch.Tensor:
        seen[:] = [act]
        return act

    return {hook_in: record, hook_out: lambda act: replace(seen[0], act)}


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
                        outliers: Rules = None,
                        progress: bool | None = None) -> list[DownstreamMetrics]:
    """Loss recovered, CE and KL for several SAEs at once: one `DownstreamMetrics` per SAE
    (CE of the clean and the spliced LM, KL, and an `Ablation` per kind in `ablations`).
    Clean and ablation passes are shared by SAEs replacing the same hook. `means`
    ({hook: (d,)}) skips the pass that computes them. `outliers` (one rule, or one per SAE;
    default: each SAE's recorded rule, else the default rule): see the module docstring."""
    batches = token_batches(tokens, batch_size)
    for kind in ablations:
        ablation_splice(kind, torch.zeros(1))  # validates the name
    hooks = [check_sae_fits(lm, sae) for sae in saes]
    rules = rules_for(saes, outliers)
    targets = list(dict.fromkeys(out for _, out in hooks))
    means = dict(means or {})
    if "mean" in ablations and any(t not in means for t in targets):
        missing = [t for t in targets if t not in means]
        means.update(hook_means(lm, batches, missing, exclude_bos=exclude_bos))
    variants: dict[str, Splices] = {}
    for t in targets:
        for kind in ablations:
            variants[f"{kind}@{t}"] = {t: ablation_splice(kind, means.get(t))}
    keeps, same_as = {}, {}
    for i, (sae, rule) in enumerate(zip(saes, rules)):
        keeps[i] = KeepFlagged(rule, int(exclude_bos)) if rule.enabled else None
        variants[f"sae{i}"] = sae_splices(lm, sae, keep=keeps[i])
        if keeps[i] is not None:
            variants[f"sae{i}_all"] = sae_splices(lm, sae)
            same_as[f"sae{i}_all"] = SameAs(f"sae{i}", lambda keep=keeps[i]: keep.last == 0)
    res = compare_splices(lm, batches, variants, exclude_bos=exclude_bos, same_as=same_as, progress=progress)
    return [_sae_entry(res, i, target, ablations, exclude_bos, keeps[i]) for i, (_, target) in enumerate(hooks)]


def _sae_entry(res: dict, i: int, target: str, ablations: Sequence[str], exclude_bos: bool,
               keep: KeepFlagged | None) -> DownstreamMetrics:
    clean, spliced = res["clean"]["ce"], res[f"sae{i}"]
    per_kind, recovered_all = {}, {}
    for kind in ablations:
        ab = res[f"{kind}@{target}"]
        per_kind[kind] = Ablation(ab["ce"], ab["kl"], loss_recovered(clean, spliced["ce"], ab["ce"]))
        if keep is not None:
            recovered_all[kind] = loss_recovered(clean, res[f"sae{i}_all"]["ce"], ab["ce"])
    everywhere = None if keep is None else AllPositions(res[f"sae{i}_all"]["ce"], res[f"sae{i}_all"]["kl"], recovered_all)
    return DownstreamMetrics(clean, spliced["ce"], spliced["kl"], per_kind, spliced["n_tokens"], exclude_bos, target,
                             outliers_kept=None if keep is None else keep.total, all_positions=everywhere)
