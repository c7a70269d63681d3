"""The feature report: everything known about each feature of one SAE, as a typed `Report`
(interpret/schema.py holds the format; interpret/dashboard.py is the one writer of its files).

`build_report` runs the one-pass scan over held-out contexts (scan.py), the logit lens
(lens.py), encoder / decoder agreement and embedding-space token lists (embedding.py) for all
features, and for the features given detail: per-token activations of their examples, ablated
text for the top few and a quantile one (ablate.py), how far the encoder's and decoder's token
lists agree, and, optionally, definition trees from either vector or both.

Examples hold the whole context (`tokens`, `acts`) with `pos` the position in it, unless
`window` is set: then tokens[0] is context position `start` and `pos` indexes `tokens`. Floats
are rounded to 4 significant digits; NaN becomes null. Ablation rows name their example by
(`quantile`, `example`): quantile None for top example i, else quantiles[b].examples[i].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from saelab.data.outliers import OutlierRule
from saelab.data.provenance import rule_for
from saelab.errors import ConfigError, DataError
from saelab.evals.metrics import DENSE_THRESHOLD, density_histogram
from saelab.interpret.ablate import AblationRequest, ablate_tokens
from saelab.interpret.embedding import (DEFAULT_PROMPT, definition_tree, enc_dec_cosine,
                                        feature_vectors, nearest_tokens, overlap)
from saelab.interpret.lens import LensResult, classify, feature_lens
from saelab.interpret.scan import SINGLE_TOKEN_SHARE, FeatureScan, ScanConfig, scan_features
from saelab.interpret.schema import (AblationRow, CoActive, Embedding, Example, FeatureDetail, FeatureSummary,
                                     Histogram, Logits, Overlap, QuantileBin, Report, SAEInfo, SkippedRows,
                                     TokenCount, TokenScore, TokenTally, TokenValue, Tree, TreeNode)
from saelab.interpret.tree_background import MIN_SHARE, BackgroundConfig, filter_tree, tree_background
from saelab.interpret.sources import ContextBatch, ContextSource, cache_source, example_acts
from saelab.interpret.vocab import token_strings, used_token_ids, vocab_mask
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits, heldout_contexts, load_lm
from saelab.sae import SAE

INDEX_LOGITS = 5
TREE_VECTORS = ("encoder", "decoder", "both")


@dataclass
class ReportOptions:
    """What the report computes; any field can also be passed to build_report by keyword."""

    features: Sequence[int] | None = None  # features given detail (None: all)
    n_contexts: int = 512  # held-out contexts scanned when no contexts are given
    context_length: int = 128  # their length (at most the model's)
    corpus: str = "stdlib"  # where those contexts come from (a data.corpus source)
    batch_size: int = 16  # contexts per forward
    # leave position 0 out of the scan when every context starts with the model's BOS, as the
    # evaluation does: BOS activations are outliers an SAE is usually not trained on, and would
    # crowd every feature's top examples and distort densities
    exclude_bos: bool = True
    # rows the rule flags (massive activations: saelab.data.outliers) are not scanned, for the
    # same reason; None: the SAE's recorded rule, else the default; OutlierRule(None): scan all
    outliers: OutlierRule | None = None
    scan: ScanConfig = field(default_factory=ScanConfig)
    window: tuple[int, int] | None = None  # tokens kept (before, after) an example; None: all
    n_logits: int = 10
    n_top_tokens: int = 10
    n_coactive: int = 10  # features most correlated with each feature given detail (0: not counted)
    n_ablate: int = 2  # top examples per feature with ablated text
    # quantile examples per feature with ablated text: the middle example of each of the
    # n_ablate_quantile non-empty bins nearest the middle of [0, max act] (what a typical, not
    # only the strongest, activation reads)
    n_ablate_quantile: int = 1
    # tokens before the position removed in turn (None: all). Ablation is the report's main cost:
    # n_features * (n_ablate + n_ablate_quantile) * (max_back + 1) sequences of up to the
    # example's position in length
    ablate_max_back: int | None = 16
    embedding_k: int = 10
    embedding_scale: float = 1.0
    embedding_exponent: float = 1.0
    tree: bool = False  # definition trees (a forward per depth level per feature)
    tree_vector: str = "encoder"  # one of TREE_VECTORS; "both" grows two trees and compares them
    tree_scale: float = 1.0
    tree_depth: int = 3
    tree_breadth: int = 3
    # leave out generic continuations (interpret/tree_background.py): those in at least
    # tree_generic_share of the trees grown from tree_background_samples random points
    tree_filter: bool = True
    tree_generic_share: float = MIN_SHARE
    tree_background_samples: int = BackgroundConfig.n_samples
    # ids that may appear in token lists: (d_vocab,) bool of ids the corpus uses, "contexts"
    # (those in the scanned contexts: drops never-trained ids, and rare ones), or None (all)
    used_ids: Tensor | str | None = "contexts"
    high_norm_z: float | None = None  # drop tokens whose unembedding norm is a z-score outlier

    def record(self) -> dict:
        """These options as JSON values, as the report keeps them (a mask given as used_ids is
        recorded as "mask", not stored)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(scan=dataclasses.asdict(self.scan),
                   outliers=None if self.outliers is None else self.outliers.to_dict(),
                   features=None if self.features is None else [int(f) for f in self.features],
                   window=None if self.window is None else [int(w) for w in self.window])
        if not (self.used_ids is None or isinstance(self.used_ids, str)):
            out["used_ids"] = "mask"
        return out


@dataclass
class ReportInputs:
    """What the per-feature parts of a report read: the model, the SAE, where the scanned
    contexts and their activations come from, every token id's string, and the options (with
    used_ids resolved to a mask)."""

    lm: HookedLM
    sae: SAE
    source: ContextSource
    vocab: list[str]
    opts: ReportOptions

    @property
    def contexts(self) -> Tensor:
        """(n, S) token ids of the scanned contexts; examples' `context` indexes its rows."""
        return self.source.tokens

    def mask(self, n: int, W: Tensor) -> Tensor:
        """Ids that token lists may show, of the first n (W (d, n): for the high-norm test)."""
        n_tok = len(self.lm.tokenizer) if self.lm.tokenizer is not None else None
        used = self.opts.used_ids[:n] if self.opts.used_ids is not None else None
        return vocab_mask(n, tokenizer_size=n_tok, used=used, W=W, high_norm_z=self.opts.high_norm_z)


def build_report(sae, model=None, contexts: Tensor | None = None, *,
                 options: ReportOptions | None = None,
                 acts: Iterable[ContextBatch] | None = None, cache=None,
                 progress: bool | None = None, **overrides) -> Report:
    """The report of `sae` (an SAE or its folder) on `model` (a HookedLM, a folder, or None:
    see saelab.lm.resolve.load_lm) over `contexts` (n, S) token ids (None: held-out contexts of
    `corpus`). `acts`: batches with precomputed activations at the SAE's hook for those same
    contexts (rows = rows of `contexts`), used by the scan instead of running the model.
    With `exclude_bos` (default) position 0 is not scanned when every context starts with BOS.
    `cache` (instead of contexts): an activation cache (ActivationCache or folder) of held-out
    text made by `model` with the SAE's hook; its first `n_contexts` (None: all) contexts are
    scanned, and examples' activations read, from it (a dropped BOS position is not scanned).
    The model still runs for the logit lens, ablation and trees. Activation rows the outlier
    rule flags (`outliers`: the SAE's recorded rule unless given) are not scanned, and read as 0
    in examples; `Report.outliers` counts them. The SAE is moved to the model's device."""
    opts = _options(options, overrides)
    sae, sae_path = _sae_and_path(sae)
    opts = dataclasses.replace(opts, outliers=rule_for(sae, opts.outliers))
    lm = load_lm(model, sae)
    check_sae_fits(lm, sae)
    sae.to(lm.device)
    detail = _detail_features(opts.features, sae.cfg.d_sae)
    source = _source(lm, sae, contexts, acts, cache, opts, progress)
    scan = scan_features(source.batches(opts.batch_size), sae, lm, config=opts.scan, progress=progress,
                         total=source.n_batches(opts.batch_size), outliers=opts.outliers,
                         coactive=torch.tensor(detail, dtype=torch.long) if opts.n_coactive > 0 else None)
    inputs = _inputs(lm, sae, source, opts)
    lens = feature_lens(sae, lm, k=max(INDEX_LOGITS, opts.n_logits), mask=inputs.mask(lm.d_vocab, lm.W_U))
    summaries = _summaries(inputs, scan, lens)
    details = _details(inputs, scan, lens, summaries, detail)
    counts, edges = density_histogram(scan.density)
    cfg = sae.cfg
    info = SAEInfo(path=sae_path, arch=cfg.arch, d_in=cfg.d_in, d_sae=cfg.d_sae, hook_name=cfg.hook_name,
                   model_name=cfg.model_name or lm.name or None)
    return Report(sae=info, n_tokens=scan.n_tokens, dense_threshold=DENSE_THRESHOLD,
                  density_hist=Histogram(_floats(edges), counts.tolist()), options=opts.record(),
                  features=[details.get(j, s) for j, s in enumerate(summaries)],
                  outliers=_skipped(scan, opts.outliers, inputs.vocab), single_token_share=SINGLE_TOKEN_SHARE)


# ---- inputs ----------------------------------------------------------------------------------
def _options(options: ReportOptions | None, overrides: dict) -> ReportOptions:
    try:
        opts = dataclasses.replace(options or ReportOptions(), **overrides)
    except TypeError as err:
        valid = ", ".join(f.name for f in dataclasses.fields(ReportOptions))
        raise ConfigError(f"unknown report option ({err}); valid: {valid}") from err
    if opts.tree_vector not in TREE_VECTORS:
        raise ConfigError(f"tree_vector must be one of {', '.join(TREE_VECTORS)}; got {opts.tree_vector!r}")
    if isinstance(opts.used_ids, str) and opts.used_ids != "contexts":
        raise ConfigError(f"used_ids must be a bool mask, 'contexts' or None, got {opts.used_ids!r}")
    return opts


def _sae_and_path(sae: SAE | str | Path) -> tuple[SAE, str | None]:
    """The SAE (in eval mode) and the folder it was loaded from, for the report's header (None
    for an SAE object)."""
    if isinstance(sae, SAE):
        return sae.eval(), None
    return SAE.load(sae).eval(), str(sae)


def _source(lm, sae, contexts, acts, cache, opts: ReportOptions, progress) -> ContextSource:
    """The one source of the scanned contexts and their activations, whichever way they were
    given: an activation cache, or `contexts` (held-out text of `corpus` when None) with the
    caller's precomputed `acts` or the LM's."""
    if cache is not None:
        if contexts is not None or acts is not None:
            raise ConfigError("give contexts (optionally with their acts) or an activation cache, not both")
        return dataclasses.replace(cache_source(cache, sae, lm, opts.n_contexts), outliers=opts.outliers)
    if contexts is None:
        contexts = heldout_contexts(lm, opts.corpus, opts.n_contexts, opts.context_length, progress=progress)
    tokens = torch.as_tensor(contexts)
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.numel() == 0:
        raise DataError(f"contexts must be a non-empty (n, seq) array of token ids, got shape "
                        f"{tuple(tokens.shape)} {tokens.dtype}")
    tokens = tokens.long().cpu()
    bos = lm.bos_token_id
    starts_with_bos = bos is not None and tokens.shape[1] > 1 and bool((tokens[:, 0] == bos).all())
    return ContextSource(tokens, start=int(opts.exclude_bos and starts_with_bos), given=acts, outliers=opts.outliers)


def _skipped(scan: FeatureScan, rule: OutlierRule, vocab: list[str]) -> SkippedRows:
    t = scan.outliers
    return SkippedRows(multiple=rule.multiple, skipped=t.n_flagged, positions=t.top_positions(),
                       tokens=[TokenTally(vocab[i], c) for i, c in t.top_tokens()])


def _inputs(lm, sae, source: ContextSource, opts: ReportOptions) -> ReportInputs:
    vocab = token_strings(lm.tokenizer, max(lm.d_vocab, lm.W_E.shape[0]))
    if isinstance(opts.used_ids, str):  # "contexts"
        opts = dataclasses.replace(opts, used_ids=used_token_ids(source.tokens, len(vocab)))
    return ReportInputs(lm, sae, source, vocab, opts)


def _detail_features(features, d_sae: int) -> list[int]:
    feats = list(range(d_sae)) if features is None else [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise ConfigError(f"feature index out of range: {bad[:10]} (valid: 0..{d_sae - 1})")
    return sorted(set(feats))


# ---- assembly --------------------------------------------------------------------------------
def _r(x) -> float | None:
    """4 significant digits; NaN / Inf -> None."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _floats(values) -> list:
    """`_r` of each value, vectorised (examples hold millions of activations)."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    exp = torch.floor(torch.log10(t.abs().clamp_min(1e-300))) - 3
    up, down = torch.pow(10.0, (-exp).clamp_min(0)), torch.pow(10.0, exp.clamp_min(0))
    out = torch.where(exp < 0, torch.round(t * up) / up, torch.round(t / down) * down)
    out = torch.where(t == 0, 0.0, out).tolist()
    return out if bool(torch.isfinite(t).all()) else [v if math.isfinite(v) else None for v in out]


def _summaries(inputs: ReportInputs, scan: FeatureScan, lens: LensResult) -> list[FeatureSummary]:
    sae, vocab = inputs.sae, inputs.vocab
    enc_dec = enc_dec_cosine(sae).tolist() if sae.cfg.d_in == sae.cfg.d_out else None
    share = scan.top_token_share().tolist()
    out = []
    for j in range(sae.cfg.d_sae):
        skew, kurt = float(lens.skew[j]), float(lens.kurtosis[j])
        out.append(FeatureSummary(
            index=j, density=_r(scan.density[j]), max_act=_r(scan.max_act[j]), mean_act=_r(scan.mean_act[j]),
            top_logits=[vocab[t] for t in lens.top_ids[j, :INDEX_LOGITS].tolist()],
            bottom_logits=[vocab[t] for t in lens.bottom_ids[j, :INDEX_LOGITS].tolist()],
            logit_skew=_r(skew), logit_kurtosis=_r(kurt), kind=classify(skew, kurt),
            enc_dec_cos=None if enc_dec is None else _r(enc_dec[j]), dead=bool(scan.count[j] == 0),
            top_token_share=_r(share[j])))
    return out


def _details(inputs: ReportInputs, scan: FeatureScan, lens: LensResult, summaries: list[FeatureSummary],
             feats: list[int]) -> dict[int, FeatureDetail]:
    if not feats:
        return {}
    opts, vocab, n = inputs.opts, inputs.vocab, inputs.opts.n_logits
    examples = _examples(inputs, scan, feats)
    ablation = _ablations(inputs, examples, feats)
    embedding = _embeddings(inputs, feats)
    background = _background(inputs) if opts.tree else None
    out = {}
    for j in feats:
        edges, counts = scan.act_hist(j)
        top, quantiles = examples[j]
        out[j] = FeatureDetail.of(
            summaries[j], act_hist=Histogram(_floats(edges), counts),
            top_tokens=[TokenCount(vocab[t], c, _r(m)) for t, c, m in scan.top_tokens(j, opts.n_top_tokens)],
            examples=top, quantiles=quantiles,
            logits=Logits(top=_token_values(lens.top_ids[j, :n], lens.top_values[j, :n], vocab),
                          bottom=_token_values(lens.bottom_ids[j, :n], lens.bottom_values[j, :n], vocab)),
            ablation=ablation[j], embedding=embedding.get(j), tree=_tree(inputs, j, background) if opts.tree else None,
            logit_hist=Histogram(_floats(lens.hist_edges(j)), lens.hist_counts[j].tolist()),
            coactive=[CoActive(b, c, _r(phi)) for b, c, phi in scan.coactive_partners(j, opts.n_coactive)]
            if opts.n_coactive > 0 else None)
    return out


def _token_values(ids: Tensor, values: Tensor, vocab) -> list[TokenValue]:
    return [TokenValue(vocab[t], _r(v)) for t, v in zip(ids.tolist(), values.tolist())]


def _examples(inputs: ReportInputs, scan: FeatureScan,
              feats: list[int]) -> dict[int, tuple[list[Example], list[QuantileBin]]]:
    """Top and quantile examples of each feature, with per-token activations fetched for the
    contexts they come from by the source's `encode_rows` (the LM again, or a cache)."""
    opts, vocab, contexts = inputs.opts, inputs.vocab, inputs.contexts
    quantiles = scan.quantiles()
    bins = {j: quantiles.of(j) for j in feats}
    wanted = []  # (feature, "top" | bin index, activation, row, pos)
    for j in feats:
        wanted += [(j, "top", *e) for e in scan.top_examples(j)]
        for b, (_, _, items) in enumerate(bins[j]):
            wanted += [(j, b, *e) for e in items]
    fetched = example_acts(inputs.source.encode_rows(inputs.sae, inputs.lm),
                           torch.tensor([w[3] for w in wanted], dtype=torch.long),
                           torch.tensor([w[4] for w in wanted], dtype=torch.long),
                           torch.tensor([w[0] for w in wanted], dtype=torch.long),
                           window=opts.window, batch_size=opts.batch_size) if wanted else []
    out = {j: ([], [QuantileBin(_r(lo), _r(hi), [], count, _r(count / max(int(scan.count[j]), 1)))
                    for (lo, hi, _), count in zip(bins[j], quantiles.counts_of(j))]) for j in feats}
    for (j, where, act, row, pos), (start, acts) in zip(wanted, fetched):
        excluded = torch.nonzero(torch.isnan(acts)).flatten().tolist()
        ex = Example(context=row, tokens=[vocab[t] for t in contexts[row, start:start + len(acts)].tolist()],
                     acts=_floats(acts), pos=pos - start, act=_r(act),
                     start=start if opts.window is not None else None, excluded=excluded or None)
        top, quantile_bins = out[j]
        (top if where == "top" else quantile_bins[where].examples).append(ex)
    return out


def _ablations(inputs: ReportInputs, examples: dict[int, tuple[list[Example], list[QuantileBin]]],
               feats: list[int]) -> dict[int, list[AblationRow]]:
    """Ablated text for each feature's top `n_ablate` examples, then its `n_ablate_quantile`
    quantile ones: one ablate_tokens call, so all of them share batched forwards."""
    opts, vocab = inputs.opts, inputs.vocab
    todo = [(j, None, i, ex) for j in feats for i, ex in enumerate(examples[j][0][:opts.n_ablate])]
    for j in feats:
        bins = examples[j][1]
        todo += [(j, b, i, bins[b].examples[i]) for b, i in _quantile_picks(bins, opts.n_ablate_quantile)]
    requests = [AblationRequest(inputs.contexts[ex.context], ex.pos + (ex.start or 0), j) for j, _, _, ex in todo]
    results = ablate_tokens(inputs.lm, inputs.sae, requests, max_back=opts.ablate_max_back) if requests else []
    out: dict[int, list[AblationRow]] = {j: [] for j in feats}
    for (j, b, i, _), req, res in zip(todo, requests, results):
        out[j].append(AblationRow(example=i, quantile=b, pos=req.pos,
                                  tokens=[vocab[t] for t in req.tokens[:req.pos + 1].tolist()],
                                  base_act=_r(res.base), delta=[None if d is None else _r(d) for d in res.delta()]))
    return out


def _quantile_picks(bins: list[QuantileBin], n: int) -> list[tuple[int, int]]:
    """(bin, example) to ablate: the middle example of each of the n non-empty bins nearest the
    middle bin (ties: the higher bin), so mid-range activations get ablated text too."""
    mid = (len(bins) - 1) / 2
    order = sorted(range(len(bins)), key=lambda b: (abs(b - mid), -b))
    return [(b, len(bins[b].examples) // 2) for b in order if bins[b].examples][:max(n, 0)]


def _embeddings(inputs: ReportInputs, feats: list[int]) -> dict[int, Embedding]:
    """Nearest tokens to each feature's encoder and decoder vectors (empty when the SAE's
    vectors are not d_model wide: nothing to compare with token embeddings)."""
    lm, sae, opts = inputs.lm, inputs.sae, inputs.opts
    if sae.cfg.d_in != lm.d_model or sae.cfg.d_out != lm.d_model:
        return {}
    mask = inputs.mask(lm.W_E.shape[0], lm.W_E.T)
    ids_of: dict[tuple[int, str], list[int]] = {}
    lists: dict[tuple[int, str], list[TokenScore]] = {}
    for which in ("encoder", "decoder"):
        for start in range(0, len(feats), 256):
            chunk = feats[start:start + 256]
            vecs = feature_vectors(lm, sae, chunk, which, opts.embedding_scale, mask)
            ids, scores = nearest_tokens(lm, vecs, k=opts.embedding_k, exponent=opts.embedding_exponent, mask=mask)
            for j, i_row, s_row in zip(chunk, ids.tolist(), scores.tolist()):
                lists[j, which] = [TokenScore(inputs.vocab[t], _r(s)) for t, s in zip(i_row, s_row)]
                ids_of[j, which] = i_row
    return {j: Embedding(encoder=lists[j, "encoder"], decoder=lists[j, "decoder"], scale=opts.embedding_scale,
                         exponent=opts.embedding_exponent,
                         overlap=_overlap(ids_of[j, "encoder"], ids_of[j, "decoder"], len(ids_of[j, "encoder"])))
            for j in feats}


def _overlap(a: list, b: list, k: int) -> Overlap:
    """`overlap` of two lists of (up to) k items, with the Jaccard rounded like all floats."""
    both = overlap(a, b)
    return Overlap(k=k, shared=both["shared"], jaccard=_r(both["jaccard"]))


def _background(inputs: ReportInputs):
    """The model's tree background for the report's tree settings (None: trees unfiltered)."""
    opts = inputs.opts
    if not opts.tree_filter:
        return None
    return tree_background(inputs.lm, BackgroundConfig(n_samples=opts.tree_background_samples, scale=opts.tree_scale,
                                                       depth=opts.tree_depth, breadth=opts.tree_breadth))


def _tree(inputs: ReportInputs, j: int, background=None) -> Tree | None:
    """Definition trees of feature j from the vector(s) `tree_vector` names, without the generic
    continuations of `background` if given; a vector that is not d_model wide is skipped (the
    ghost token needs one), None when none is."""
    lm, sae, opts = inputs.lm, inputs.sae, inputs.opts
    which = ("encoder", "decoder") if opts.tree_vector == "both" else (opts.tree_vector,)
    width = {"encoder": sae.cfg.d_in, "decoder": sae.cfg.d_out}
    roots = {}
    for w in (w for w in which if width[w] == lm.d_model):
        vec = feature_vectors(lm, sae, [j], w, opts.tree_scale)[0]
        root = definition_tree(lm, vec, depth=opts.tree_depth, breadth=opts.tree_breadth)
        roots[w] = _round_tree(root if background is None else filter_tree(root, background, opts.tree_generic_share))
    if not roots:
        return None
    first = [[c.text for c in root.children] for root in roots.values()]
    return Tree(prompt=DEFAULT_PROMPT, vector=opts.tree_vector, scale=opts.tree_scale, roots=roots,
                overlap=_overlap(*first, opts.tree_breadth) if len(roots) == 2 else None,
                generic_share=None if background is None else opts.tree_generic_share,
                background_trees=None if background is None else background.n_trees)


def _round_tree(node: dict) -> TreeNode:
    return TreeNode(text=node["text"], prob=_r(node["prob"]), children=[_round_tree(c) for c in node["children"]],
                    background=node.get("background"), generic=node.get("generic"))
