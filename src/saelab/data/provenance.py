"""What text an SAE was trained on and which rows counted: recorded with the SAE, read back by
every tool that runs it, so a dashboard or an evaluation reads the same kind of text, at the
same context length, with the same BOS and outlier rules, unless told otherwise.

Saved in the SAE's config as `cfg.metadata["provenance"]` (and, where SAELens has keys for it,
as `dataset_path`, `context_size` and `metadata.prepend_bos` of cfg.json: saelab.sae.format).
SAEs saved before provenance was recorded, or made elsewhere, have none: each field is then
None and tools fall back to their own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.data.outliers import OutlierRule, Rules, one_per
from saelab.errors import ConfigError
from saelab.sae.config import PROVENANCE


@dataclass(frozen=True)
class Provenance:
    """The training text and row rules of an SAE; None where not recorded."""

    source: str | None = None  # the text source spec: "stdlib-docs", a path, "hf:NAME"
    context_length: int | None = None  # tokens per training context
    prepend_bos: bool | None = None  # every context started with BOS
    exclude_bos: bool | None = None  # the BOS position was left out of training
    outliers: OutlierRule | None = None  # the outlier rule (a rule with multiple None: trained without one)

    def to_dict(self) -> dict:
        return {"source": self.source, "context_length": self.context_length, "prepend_bos": self.prepend_bos,
                "exclude_bos": self.exclude_bos, "outliers": None if self.outliers is None else self.outliers.to_dict()}

    @classmethod
    def from_dict(cls, data: dict | None) -> Provenance:
        data = dict(data or {})
        unknown = sorted(set(data) - {"source", "context_length", "prepend_bos", "exclude_bos", "outliers"})
        if unknown:
            raise ConfigError(f"unknown provenance key(s) {unknown} in an SAE's metadata")
        rule = data.pop("outliers", None)
        return cls(**data, outliers=None if rule is None else OutlierRule.from_dict(rule))

    @classmethod
    def of(cls, sae) -> Provenance:
        """What an SAE (or its SAEConfig) records; all None when it records nothing."""
        cfg = getattr(sae, "cfg", sae)
        return cls.from_dict((cfg.metadata or {}).get(PROVENANCE))


def rule_for(sae, given: OutlierRule | None = None) -> OutlierRule:
    """The outlier rule to evaluate or scan `sae` with: `given`, else the one it was trained
    with, else the default rule."""
    if given is not None:
        return given
    return Provenance.of(sae).outliers or OutlierRule()


def rules_for(saes, given: Rules = None) -> list[OutlierRule]:
    """`rule_for` each SAE, `given` being one rule, one per SAE, or None."""
    return [rule_for(sae, rule) for sae, rule in zip(saes, one_per(given, len(saes)))]
