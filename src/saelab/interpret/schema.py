"""The feature report's format: small dataclasses shared by its writer (interpret/report.py
builds them) and its renderer (interpret/dashboard.py reads them), so the two cannot disagree.
Torch-free, like the renderer. `report_schema()` is the JSON Schema of the files, generated from
these classes (interpret/records.py) and written beside them as report.schema.json.

A dashboard folder holds report.json, a `Report` whose features are `FeatureSummary` rows (the
index), and features/<i>.json, one `FeatureDetail` each (a summary's fields plus the detail). In
memory `Report.features` holds a `FeatureDetail` for each feature given detail. Floats are
rounded to 4 significant digits by the writer, null where not finite.

Versions: 2 added `dense_threshold` and `options`; 3 added `outliers` (the rows an outlier rule
kept out of the scan; absent when no rule was applied); 4 added, all optional, a feature's
`logit_hist` (its logit-lens weights over the vocabulary) and `coactive` (the features firing most
in step with it), each quantile bin's `count` and `share` of the active tokens, and an
example's `excluded` positions (BOS, outlier rows: not scanned, so no activation). The optional `top_token_share` (per
feature) and `single_token_share` (the report's threshold) may be absent from older files (their
single-token count is then unknown). Schema-1 reports are still read: their dense threshold was
the renderer's fixed 0.1, their options were not recorded, and a tree held as "vector" + "root"
becomes "roots". Schema-2 and -3 reports read as they are. Other versions are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saelab.errors import DataError
from saelab.interpret.records import OMIT_NONE, Record, dump_fields, json_schema

SCHEMA = 4
READS = (1, 2, 3, 4)
SCHEMA_FILE = "report.schema.json"
V1_DENSE_THRESHOLD = 0.1  # schema 1 carried no threshold: its renderer counted density > 0.1 as dense


@dataclass
class SAEInfo(Record):
    """The SAE a report describes."""

    path: str | None  # the folder it was loaded from (None: an SAE object)
    arch: str
    d_in: int
    d_sae: int
    hook_name: str
    model_name: str | None


@dataclass
class Histogram(Record):
    """Bar counts between edges: len(edges) == len(counts) + 1 (both empty for a dead feature)."""

    edges: list[float]
    counts: list[int]


@dataclass
class FeatureSummary(Record):
    """One feature's row in the index: scan statistics and its logit lens at a glance."""

    index: int
    density: float | None  # fraction of scanned tokens it is active (> 0) on
    max_act: float | None
    mean_act: float | None  # over the tokens where it is active
    top_logits: list[str]  # tokens its decoder direction promotes most (interpret/lens.py)
    bottom_logits: list[str]  # and suppresses most
    logit_skew: float | None
    logit_kurtosis: float | None
    kind: str  # prediction, suppression, partition or other (interpret/lens.classify)
    enc_dec_cos: float | None  # cosine of its encoder and decoder vectors (None: d_in != d_out)
    dead: bool  # never active in the scan
    # share of its activation mass on the one token id holding the most (interpret/scan.py;
    # absent: dead, or a report made before it was measured)
    top_token_share: float | None = field(default=None, kw_only=True, metadata=OMIT_NONE)

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """A FeatureDetail when `data` carries detail, else a summary."""
        if cls is FeatureSummary and isinstance(data, dict) and any(k in data for k in DETAIL_KEYS):
            return FeatureDetail.from_dict(data, where)
        return super().from_dict(data, where)

    def summary_dict(self) -> dict:
        """The index row alone (a FeatureDetail's detail left out)."""
        return dump_fields(FeatureSummary, self)


@dataclass
class Example(Record):
    """A context where the feature fires, with its activation on every token shown."""

    context: int  # row of the scanned contexts
    tokens: list[str]
    acts: list[float | None]  # the feature's activation on each of `tokens`
    pos: int  # the example's position, an index into `tokens`
    act: float | None  # the activation there
    # context position of tokens[0]; present only when the report keeps a window around `pos`
    start: int | None = field(default=None, metadata=OMIT_NONE)
    # indices into `tokens` that were not scanned (the BOS position, outlier rows): their
    # activation is not a measurement (`acts` holds null there); absent when there are none
    excluded: list[int] | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class QuantileBin(Record):
    """Examples sampled uniformly from the active tokens with activation in (lo, hi]."""

    lo: float | None
    hi: float | None
    examples: list[Example]
    # active tokens with activation in (lo, hi], and their share of all the feature's active
    # tokens (absent: a report made before they were counted)
    count: int | None = field(default=None, metadata=OMIT_NONE)
    share: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class TokenCount(Record):
    """A token the feature fires on: how often, and its mean activation there."""

    token: str
    count: int
    mean_act: float | None


@dataclass
class TokenValue(Record):
    """A token and its logit-lens weight."""

    token: str
    value: float | None


@dataclass
class Logits(Record):
    """The tokens the feature's decoder direction promotes (top) and suppresses (bottom) most."""

    top: list[TokenValue]
    bottom: list[TokenValue]


@dataclass
class CoActive(Record):
    """A feature that fires in step with this one over the scanned tokens (interpret/scan.py)."""

    index: int
    count: int  # tokens both fire on
    correlation: float | None  # phi: Pearson correlation of the two features' "fires" indicators


@dataclass
class AblationRow(Record):
    """How the activation at `pos` changes when each earlier token is removed (interpret/ablate.py)."""

    example: int  # which example: examples[example], or quantiles[quantile].examples[example]
    quantile: int | None  # None: a top example
    pos: int  # position in the context (= len(tokens) - 1)
    tokens: list[str]  # the context up to and including pos
    base_act: float | None  # the activation with every token present
    delta: list[float | None]  # per token: activation without it minus base_act (None: not measured)


@dataclass
class TokenScore(Record):
    """A token near a feature vector in embedding space, and its score (interpret/embedding.py)."""

    token: str
    score: float | None


@dataclass
class Overlap(Record):
    """How much two lists of (up to) k items share."""

    k: int
    shared: int
    jaccard: float | None


@dataclass
class Embedding(Record):
    """The tokens nearest the feature's encoder and decoder vectors, and their agreement."""

    encoder: list[TokenScore]
    decoder: list[TokenScore]
    scale: float  # the vector's norm, in mean token norms
    exponent: float  # on the cosine in the score
    overlap: Overlap  # of the two lists' token ids


@dataclass
class TreeNode(Record):
    """A continuation in a definition tree, with its cumulative probability."""

    text: str
    prob: float | None
    children: list[TreeNode]
    # filtered trees only (interpret/tree_background.py): the share of the background's trees
    # holding this continuation, and whether that makes it generic (kept as a specific one's context)
    background: float | None = field(default=None, metadata=OMIT_NONE)
    generic: bool | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class Tree(Record):
    """Definition trees: the model's continuations of a prompt holding the feature vector as a
    ghost token, from the encoder vector, the decoder vector or both."""

    prompt: str
    vector: str  # encoder, decoder or both
    scale: float
    roots: dict[str, TreeNode]  # by vector
    overlap: Overlap | None  # of the two roots' first-level texts; None unless both grew
    # filtered trees: continuations in at least this share of `background_trees` trees grown from
    # random points were generic, and left out (absent: the whole tree)
    generic_share: float | None = field(default=None, metadata=OMIT_NONE)
    background_trees: int | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class FeatureDetail(FeatureSummary):
    """A feature given detail: its summary's fields, then what its page shows."""

    act_hist: Histogram  # exact histogram of its active values
    top_tokens: list[TokenCount]
    examples: list[Example]  # max-activating contexts, highest first
    quantiles: list[QuantileBin]  # low to high
    logits: Logits
    ablation: list[AblationRow]  # top examples first, then quantile ones
    embedding: Embedding | None  # None: the SAE's vectors are not d_model wide
    tree: Tree | None  # None: not asked for, or no vector is d_model wide
    # its logit-lens weights over every listed token id (absent: no logit lens, or an older report)
    logit_hist: Histogram | None = field(default=None, kw_only=True, metadata=OMIT_NONE)
    # the features most correlated with it, highest first (absent: not measured)
    coactive: list[CoActive] | None = field(default=None, kw_only=True, metadata=OMIT_NONE)

    @classmethod
    def of(cls, summary: FeatureSummary, **detail) -> FeatureDetail:
        return cls(**{f.name: getattr(summary, f.name) for f in dataclasses.fields(FeatureSummary)}, **detail)


_SUMMARY_KEYS = {f.name for f in dataclasses.fields(FeatureSummary)}
DETAIL_KEYS = tuple(f.name for f in dataclasses.fields(FeatureDetail) if f.name not in _SUMMARY_KEYS)


@dataclass
class ReportStats:
    """The index's counts, derived from the features (not stored)."""

    n: int
    dead: int
    dense: int  # features with density > dense_threshold
    dense_threshold: float
    kinds: dict[str, int]
    single_token: int | None = None  # features with top_token_share > single_token_share (None: not measured)
    single_token_share: float | None = None


@dataclass
class TokenTally(Record):
    """A token and how many rows it was at."""

    token: str
    count: int


@dataclass
class SkippedRows(Record):
    """Activation rows an outlier rule (saelab.data.outliers) kept out of the scan: not
    examples, not counted in densities or `n_tokens`."""

    multiple: float | None  # rows with norm above this times the batch's median norm (None: no rule)
    skipped: int
    positions: list[list[int]]  # [[context position, rows skipped there], ...] most frequent first
    tokens: list[TokenTally]  # the tokens at those rows, most frequent first


@dataclass
class Report(Record):
    """Everything known about each feature of one SAE."""

    schema: int = field(default=SCHEMA, kw_only=True, metadata={"const": SCHEMA})
    sae: SAEInfo
    n_tokens: int  # tokens scanned
    dense_threshold: float  # density above which a feature counts as dense (evals.metrics.DENSE_THRESHOLD)
    density_hist: Histogram  # of log10(density); dead features in the first bin
    options: dict | None  # the ReportOptions it was built with, as JSON (None: not recorded)
    features: list[FeatureSummary]  # one per feature of the SAE
    outliers: SkippedRows | None = field(default=None, metadata=OMIT_NONE)  # None: no outlier rule applied
    # top_token_share above which a feature counts as single-token (absent: not measured)
    single_token_share: float | None = field(default=None, kw_only=True, metadata=OMIT_NONE)

    def __post_init__(self):
        seen = set()
        for feat in self.features:
            if feat.index in seen:
                raise DataError(f"feature index {feat.index} appears twice in the report")
            seen.add(feat.index)

    @classmethod
    def from_dict(cls, data, where: str = "report"):
        """A report from its JSON (current or schema 1), or a DataError saying what is wrong."""
        if not isinstance(data, dict):
            raise DataError(f"a feature report is a JSON object (a dict), got {type(data).__name__}")
        version = data.get("schema")
        if version not in READS:
            raise DataError(f"feature report schema {version!r} is not supported; this saelab reads "
                            f"schemas {', '.join(map(str, READS))}")
        return super().from_dict(_from_v1(data) if version == 1 else {**data, "schema": SCHEMA}, where)

    def index_dict(self) -> dict:
        """report.json: the report with the features' summaries only."""
        out = dataclasses.replace(self, features=[]).to_dict()
        out["features"] = [f.summary_dict() for f in self.features]
        return out

    def stats(self) -> ReportStats:
        kinds: dict[str, int] = {}
        for f in self.features:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        dense = sum(f.density is not None and f.density > self.dense_threshold for f in self.features)
        share = self.single_token_share
        single = None if share is None else sum(f.top_token_share is not None and f.top_token_share > share
                                                for f in self.features)
        return ReportStats(n=len(self.features), dead=sum(f.dead for f in self.features), dense=dense,
                           dense_threshold=self.dense_threshold, kinds=dict(sorted(kinds.items())),
                           single_token=single, single_token_share=share)


def _from_v1(data: dict) -> dict:
    """A schema-1 report's JSON as schema 2 (see the module docstring)."""
    features = data.get("features")
    if isinstance(features, list):
        features = [_tree_v1(f) if isinstance(f, dict) and isinstance(f.get("tree"), dict) else f
                    for f in features]
    return {**data, "schema": SCHEMA, "dense_threshold": V1_DENSE_THRESHOLD, "options": None,
            "features": features}


def _tree_v1(feat: dict) -> dict:
    tree = feat["tree"]
    if "roots" in tree or "root" not in tree:
        return feat
    vector = tree.get("vector") or "encoder"
    return {**feat, "tree": {"prompt": tree.get("prompt"), "vector": vector, "scale": tree.get("scale"),
                             "roots": {vector: tree["root"]}, "overlap": None}}


def report_schema() -> dict:
    """The JSON Schema of report.json; features/<i>.json files are its #/$defs/FeatureDetail."""
    return json_schema(Report, title=f"saelab feature report, schema {SCHEMA}",
                       description="report.json of a saelab dashboard; each features/<i>.json is a "
                                   "#/$defs/FeatureDetail. Made by saelab.interpret.schema.report_schema.",
                       extra=(FeatureDetail,))
