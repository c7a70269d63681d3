"""The metrics.json row, typed, and the one writer and one reader of metrics.json.

A run folder's metrics.json is a list with one row per SAE. A row (`MetricsEntry`) is:

    name         the SAE's label (its saes/<name>/ folder in a training run)
    recon        reconstruction and sparsity (`SAEMetrics`: mse, fvu, l0, dead, dense, ...)
    downstream   what splicing it into the LM does (`DownstreamMetrics`), when an LM was run
    spec         the TrainSpec it was trained with (`TrainSpec.to_dict()`), for trained SAEs
    extra        an experiment's own columns: objects with `to_dict()` (ground-truth recovery,
                 a prune plan, sparse-MLP neuron matches, ...)

`to_dict()` flattens a row into the JSON entry that plots, tables, `prune --compare` and the
dashboard read by key: name, the SAEMetrics keys (with an outlier rule: outliers,
outlier_share, outlier_multiple, outlier_positions, outlier_tokens, mse_all, fvu_all), the
downstream keys (ce_clean, ce_sae, kl, ce_delta, then ce_<a>, kl_<a> and loss_recovered
(zero) / loss_recovered_<a> per ablation a, downstream_tokens, exclude_bos, splice_hook; with
an outlier rule also outliers_kept, ce_sae_all, kl_all, ce_delta_all and loss_recovered_all /
loss_recovered_<a>_all), spec, then the extra columns. `from_dict` reads
one back; columns no type claims come back as `Extra`. The spec stays a plain dict so rows of
runs made before a TrainSpec field was added or renamed still read.

Loss recovered is stored as a fraction (1.0: the splice costs nothing over the clean model) and
shown as a percent in every table and plot (`recovered_column`; docs/metrics.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from saelab.atomic import write_json
from saelab.errors import ConfigError, CorruptFileError, MissingFileError
from saelab.evals.metrics import SAEMetrics
from saelab.tables import Column

METRICS_FILE = "metrics.json"
_DOWNSTREAM_KEYS = ("ce_clean", "ce_sae", "kl", "ce_delta", "downstream_tokens", "exclude_bos", "splice_hook",
                    "ce_sae_all", "ce_delta_all", "kl_all", "outliers_kept")


class Columns(Protocol):
    """An experiment's own columns of a row."""

    def to_dict(self) -> dict: ...


@dataclass
class Extra:
    """Columns read back from a metrics.json that no typed class claims (or ad hoc ones)."""

    values: dict

    def to_dict(self) -> dict:
        return dict(self.values)


def recovered_key(ablation: str) -> str:
    """The metrics.json key of loss recovered against `ablation`: "loss_recovered" for zero
    ablation (the headline number), "loss_recovered_<ablation>" otherwise."""
    return "loss_recovered" if ablation == "zero" else f"loss_recovered_{ablation}"


@dataclass
class Ablation:
    """The LM with the hook's activation ablated: its CE, KL(clean || ablated), and the share
    of the ablation's CE increase that the SAE's splice recovers."""

    ce: float
    kl: float
    loss_recovered: float


@dataclass
class AllPositions:
    """The SAE spliced at every position (BOS still excepted with exclude_bos), outliers
    included: its CE, KL(clean || spliced) and loss recovered per ablation kind."""

    ce: float
    kl: float
    loss_recovered: dict[str, float]


@dataclass
class DownstreamMetrics:
    """CE (nats) of the clean and the SAE-spliced LM, KL(clean || spliced), and one `Ablation`
    per ablation kind ("zero", "mean"); see `saelab.evals.downstream` for the definitions.
    With an outlier rule, `outliers_kept` positions kept their clean activation in the splice
    and `all_positions` is the splice without that exception."""

    ce_clean: float
    ce_sae: float
    kl: float
    ablations: dict[str, Ablation]
    downstream_tokens: int
    exclude_bos: bool
    splice_hook: str
    outliers_kept: int | None = None
    all_positions: AllPositions | None = None

    @property
    def ce_delta(self) -> float:
        """CE_sae - CE_clean (nats)."""
        return self.ce_sae - self.ce_clean

    @property
    def loss_recovered(self) -> float | None:
        """Against zero ablation, or None when zero ablation was not run."""
        zero = self.ablations.get("zero")
        return None if zero is None else zero.loss_recovered

    def to_dict(self) -> dict:
        out = {"ce_clean": self.ce_clean, "ce_sae": self.ce_sae, "kl": self.kl, "ce_delta": self.ce_delta}
        for kind, ab in self.ablations.items():
            out[f"ce_{kind}"], out[f"kl_{kind}"], out[recovered_key(kind)] = ab.ce, ab.kl, ab.loss_recovered
        out.update(downstream_tokens=self.downstream_tokens, exclude_bos=self.exclude_bos, splice_hook=self.splice_hook)
        if self.outliers_kept is not None:
            out["outliers_kept"] = self.outliers_kept
        if self.all_positions is not None:
            every = self.all_positions
            out.update(ce_sae_all=every.ce, kl_all=every.kl, ce_delta_all=every.ce - self.ce_clean)
            out.update({recovered_key(kind) + "_all": value for kind, value in every.loss_recovered.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> DownstreamMetrics | None:
        """The downstream part of a flat row, or None if the row has none."""
        if "ce_sae" not in d:
            return None
        kinds = [k[3:] for k in d if k.startswith("ce_") and k not in _DOWNSTREAM_KEYS
                 and f"kl_{k[3:]}" in d and recovered_key(k[3:]) in d]
        ablations = {a: Ablation(d[f"ce_{a}"], d[f"kl_{a}"], d[recovered_key(a)]) for a in kinds}
        every = None
        if "ce_sae_all" in d:
            every = AllPositions(d["ce_sae_all"], d["kl_all"],
                                 {a: d[recovered_key(a) + "_all"] for a in kinds if recovered_key(a) + "_all" in d})
        return cls(d["ce_clean"], d["ce_sae"], d["kl"], ablations, d["downstream_tokens"], d["exclude_bos"],
                   d["splice_hook"], d.get("outliers_kept"), every)


@dataclass
class MetricsEntry:
    """One metrics.json row (see the module docstring). Reads like its JSON entry too:
    `row["l0"]`, `row.get("loss_recovered")`, for code that picks columns by name."""

    name: str
    recon: SAEMetrics
    downstream: DownstreamMetrics | None = None
    spec: dict | None = None
    extra: list[Columns] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"name": self.name, **self.recon.to_dict()}
        if self.downstream is not None:
            out.update(self.downstream.to_dict())
        if self.spec is not None:
            out["spec"] = self.spec
        for columns in self.extra:
            more = columns.to_dict()
            clash = sorted(set(more) & set(out))
            if clash:
                raise ConfigError(f"{type(columns).__name__} of row {self.name!r} would overwrite {clash}; "
                                  "an experiment's columns need names of their own")
            out.update(more)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> MetricsEntry:
        """A row from its metrics.json entry; unclaimed columns become one `Extra`."""
        recon = SAEMetrics.from_dict(d)
        downstream = DownstreamMetrics.from_dict(d)
        claimed = {"name", "spec", *recon.to_dict(), *(downstream.to_dict() if downstream else ())}
        rest = {k: v for k, v in d.items() if k not in claimed}
        return cls(d["name"], recon, downstream, d.get("spec"), [Extra(rest)] if rest else [])

    def __getitem__(self, key: str):
        flat = self.to_dict()
        if key not in flat:
            raise KeyError(f"{key!r} is not a column of row {self.name!r}; it has {', '.join(flat)}")
        return flat[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


def recovered_column(key: str = "loss_recovered", header: str | None = None) -> Column:
    """A table column of loss recovered (`key`: loss_recovered, loss_recovered_mean, ..._all):
    stored as a fraction, shown as a percent with one decimal, as the plots show it."""
    return Column(key, header, ".1%")


# shown beside a table's columns when some row had outlier rows: how many, and FVU and loss
# recovered with them replaced too
OUTLIER_COLUMNS = ("outliers", "fvu_all", recovered_column("loss_recovered_all"))


def with_outlier_columns(columns: Sequence, rows: Sequence) -> tuple:
    """`columns`, and OUTLIER_COLUMNS after them when some row had outlier rows: a model without
    massive activations gets the table it always had."""
    return tuple(columns) + (OUTLIER_COLUMNS if any(row.get("outliers") for row in rows) else ())


def write_metrics(run_dir: str | Path, rows: Sequence[MetricsEntry]) -> Path:
    """Write `rows` as run_dir/metrics.json, atomically (a crash leaves the old file or the new)."""
    return write_json(Path(run_dir) / METRICS_FILE, [row.to_dict() for row in rows])


def read_metrics(run_dir: str | Path) -> list[MetricsEntry]:
    """The rows of run_dir/metrics.json, as written by `write_metrics`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise MissingFileError(f"{run_dir} has no {METRICS_FILE} (a run folder from `saelab train`, `quickstart`, "
                               "`toy`, `sparse-mlp` or `prune` has one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"expected a list of rows, got {type(data).__name__}")
        return [MetricsEntry.from_dict(d) for d in data]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{path} is not a metrics file saelab can read ({err!r}); "
                               "write it again by re-running the evaluation") from err
