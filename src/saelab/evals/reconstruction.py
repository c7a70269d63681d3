"""Evaluate several SAEs on the same data in one pass: reconstruction and sparsity from any
activation batches, plus what splicing them into a language model does.

`evaluate_saes(saes, batches)` is the one evaluation loop. A batch is

    x (N, d_in)      every SAE reads x and reconstructs it
    (x, y)           every SAE reads x and predicts y (transcoders)
    PerSAE(...)      one x or (x, y) per SAE, for SAEs that read different hooks

so toy data, cached activations and a live LM go through the same code. `lm_batches` is the
live-LM adapter: one early-stopping LM pass per token batch for every hook the SAEs need,
yielding each SAE's rows (BOS position dropped with `exclude_bos`) and where they sat
(`RowsAt`: positions, token ids). `evaluate_on_lm` adds the downstream metrics of
`saelab.evals.downstream` (shared clean and ablation passes; the mean-ablation baseline is
summed from the reconstruction pass's rows, `TargetMeans`). Metric definitions live in
`saelab.evals.metrics` and `saelab.evals.downstream`, nowhere else. Activations holding NaN or
Inf are refused (`saelab.evals.finite`), naming the hook and the first such row's context and
position (`RowsAt`), or its row number for plain batches.

Massive activations: with an `OutlierRule` (saelab.data.outliers), each SAE's rows are judged
batch by batch on its input x; flagged rows are left out of every metric, and the row's
`OutlierReport` counts them (positions and tokens too, from `RowsAt`) and gives mse / fvu over
all rows. `evaluate_saes` applies a rule only when given one; `evaluate_on_lm` always does:
the one given, else each SAE's recorded rule, else the default (saelab.data.provenance).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from saelab.data.cache.shuffle import as_pair, hook_rows
from saelab.data.outliers import OutlierRule, OutlierTally, Rules, one_per
from saelab.data.provenance import rules_for
from saelab.errors import DataError
from saelab.evals.downstream import evaluate_downstream, token_batches
from saelab.evals.entry import DownstreamMetrics
from saelab.evals.finite import refuse_nonfinite
from saelab.evals.metrics import DENSE_THRESHOLD, MetricsAccumulator, OutlierReport, ReconstructionStats, SAEMetrics
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits
from saelab.sae import SAE

class RowsAt(NamedTuple):
    """Where a batch's rows came from: each row's position in its context and its token id
    (and, from `lm_batches`, the index of its context among the tokens evaluated)."""

    positions: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N,)
    contexts: torch.Tensor | None = None  # (N,)

    def describe(self, row: int) -> str:
        """Where row `row` sat, in words."""
        context = "" if self.contexts is None else f"context {int(self.contexts[row])}, "
        return f"{context}position {int(self.positions[row])}"


class PerSAE(tuple):
    """A batch holding one x or (x, y) per SAE, in the order of the SAEs being evaluated, and
    optionally where its rows sat (`at`, the same rows for every SAE)."""

    def __new__(cls, parts: Iterable, at: RowsAt | None = None):
        batch = super().__new__(cls, parts)
        batch.at = at
        return batch


class Evaluation(NamedTuple):
    """One SAE's evaluation on an LM: reconstruction and sparsity, and the downstream metrics
    (None when they were not asked for)."""

    recon: SAEMetrics
    downstream: DownstreamMetrics | None


class _SAETally:
    """One SAE's metrics over the rows its rule keeps; with a rule, also over all rows and a
    tally of the flagged ones."""

    def __init__(self, dense_threshold: float, rule: OutlierRule | None):
        self.kept, self.rule = MetricsAccumulator(dense_threshold=dense_threshold), rule
        self.all, self.flagged = ReconstructionStats(), OutlierTally()
        self.rows_seen = 0

    def update(self, sae: SAE, x: torch.Tensor, y: torch.Tensor, at: RowsAt | None) -> None:
        dev = sae.W_enc.device
        same = y is x
        x, y = x.to(dev).float(), y.to(dev).float()
        row0 = self.rows_seen
        where = at.describe if at is not None else (lambda i: f"row {row0 + i} of the evaluation rows")
        refuse_nonfinite(x, sae.cfg.hook_name, where)
        if not same:
            refuse_nonfinite(y, sae.cfg.hook_name_out, where)
        self.rows_seen += x.shape[0]
        f = sae.encode(x)
        x_hat = sae.decode(f)
        if self.rule is None:
            self.kept.update(y, x_hat, f)
            return
        mask = self.rule.mask(x)
        self.all.update(y, x_hat)
        self.flagged.update(mask, *(at[:2] if at is not None else (None, None)))
        if bool(mask.any()):
            keep = ~mask
            y, x_hat, f = y[keep], x_hat[keep], f[keep]
        self.kept.update(y, x_hat, f)

    def result(self, token_text: Callable[[int], str] | None) -> SAEMetrics:
        m = self.kept.result()
        if self.rule is not None:
            t, text = self.flagged, token_text or int
            m.outliers = OutlierReport(self.rule.multiple, t.n_flagged, t.share, self.all.mse, self.all.fvu,
                                       t.top_positions(), [[text(i), c] for i, c in t.top_tokens()])
        return m


@torch.no_grad()
def evaluate_saes(saes: Sequence[SAE], batches: Iterable, dense_threshold: float = DENSE_THRESHOLD, *,
                  outliers: Rules = None, token_text: Callable[[int], str] | None = None) -> list[SAEMetrics]:
    """Reconstruction and sparsity metrics, one `SAEMetrics` per SAE, over every row of
    `batches` (see the module docstring for what a batch may be). SAEs run in eval mode on
    their own device; rows are compared in float32 against the SAE's target. With `outliers`
    (a rule, or one per SAE) the rows it flags in each batch are left out and reported
    (`SAEMetrics.outliers`; `token_text` turns the token ids of `RowsAt` into text)."""
    rules = one_per(outliers, len(saes))
    tallies = [_SAETally(dense_threshold, rule) for rule in rules]
    for sae in saes:
        sae.eval()
    for batch in batches:
        at = getattr(batch, "at", None)
        for sae, tally, (x, y) in zip(saes, tallies, _per_sae(batch, len(saes))):
            tally.update(sae, x, y, at)
    return [tally.result(token_text) for tally in tallies]


def _per_sae(batch, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batch, PerSAE):
        if len(batch) != n:
            raise DataError(f"a PerSAE batch holds {len(batch)} parts for {n} SAEs; give one per SAE")
        return [as_pair(part) for part in batch]
    return [as_pair(batch)] * n


def lm_batches(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
               exclude_bos: bool = True) -> Iterator[PerSAE]:
    """PerSAE batches of each SAE's (input rows, target rows) from the LM on `tokens` ((n, seq)
    tensor or iterable of (b, seq) batches), with their `RowsAt`: one early-stopping pass per
    batch feeds every hook. The SAEs are checked against the model first (hook names, widths)."""
    hooks = [check_sae_fits(lm, sae) for sae in saes]
    names = list(dict.fromkeys(h for pair in hooks for h in pair))
    batches = token_batches(tokens, batch_size)
    first = int(exclude_bos)

    def generate() -> Iterator[PerSAE]:
        done = 0
        for batch in batches:
            rows = hook_rows(lm, batch, names, drop_bos=exclude_bos)
            n, per = batch.shape[0], batch.shape[1] - first
            at = RowsAt(torch.arange(first, batch.shape[1]).repeat(n), batch[:, first:].reshape(-1),
                        torch.arange(done, done + n).repeat_interleave(per))
            done += n
            yield PerSAE(((rows[h_in], rows[h_out]) for h_in, h_out in hooks), at)
    return generate()


def evaluate_on_lm(lm: HookedLM, saes: Sequence[SAE], tokens, *, batch_size: int = 16,
                   exclude_bos: bool = True, downstream: bool = True, outliers: Rules = None,
                   progress: bool | None = None) -> list[Evaluation]:
    """Reconstruction metrics over every (non-BOS) position of `tokens`, and with `downstream`
    loss recovered, CE and KL of each SAE spliced in: one `Evaluation` per SAE. Outlier rows
    are judged by `outliers` (one rule, or one per SAE), else each SAE's recorded rule, else the
    default: left out of the metrics and reported, and kept clean in the splice (with a splice
    of every position reported beside it; saelab.evals.downstream)."""
    rules = rules_for(saes, outliers)
    means = TargetMeans([check_sae_fits(lm, sae)[1] for sae in saes])
    batches = lm_batches(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos)
    recon = evaluate_saes(saes, means.tap(batches), outliers=rules, token_text=lambda i: _token_text(lm, i))
    if not downstream:
        return [Evaluation(r, None) for r in recon]
    down = evaluate_downstream(lm, saes, tokens, batch_size=batch_size, exclude_bos=exclude_bos, outliers=rules,
                               means=means.result(lm.W_E.dtype), progress=progress)
    return [Evaluation(r, d) for r, d in zip(recon, down)]


class TargetMeans:
    """The mean of each SAE target hook's rows, summed (float64) as the reconstruction pass
    streams them, batch by batch as `hook_means` sums them: the mean-ablation baseline then
    costs no LM pass of its own. `targets`: each SAE's output hook, in the order of the SAEs."""

    def __init__(self, targets: Sequence[str]):
        self.first = {t: i for i, t in reversed(list(enumerate(targets)))}  # the first SAE per hook
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def tap(self, batches: Iterable[PerSAE]) -> Iterator[PerSAE]:
        for batch in batches:
            for target, i in self.first.items():
                s = batch[i][1].double().sum(0)
                self.sums[target] = self.sums[target] + s if target in self.sums else s
            self.n += batch[0][1].shape[0]
            yield batch

    def result(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{hook: mean (d,)} in the LM's dtype; {} when no rows were seen."""
        return {t: (s / self.n).to(dtype) for t, s in self.sums.items()} if self.n else {}


def _token_text(lm: HookedLM, token_id: int) -> str:
    return lm.tokenizer.decode([token_id]) if lm.tokenizer is not None else str(token_id)
