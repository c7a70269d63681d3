"""Massive activations: the one rule for which activation rows are outliers, and a tally of them.

Real LMs put a few rows at norms hundreds of times the median (SmolLM2-135M at
blocks.15.hook_resid_post: position 0 at ~20,500 against a median of ~170, document separators
at 85-145x; 1% of the rows, 44% of the variance). Left in, they dominate an SAE's loss, its
activation scale and its FVU. The rule: a row is an outlier when its norm exceeds `multiple`
times the median row norm of the rows it is judged with (a batch: outliers are ~1% of rows,
so the median is robust). The same `OutlierRule` is applied by training (saelab.train.group),
reconstruction metrics and the loss-recovered splice (saelab.evals) and the feature scan
(saelab.interpret); `DEFAULT_MULTIPLE` is the one default. Ordinary rows of the offline
default LM stay under 3x the median, so nothing is flagged there.

`OutlierTally` counts flagged rows and where they sat (positions, token ids) for reports.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from saelab.errors import ConfigError

DEFAULT_MULTIPLE = 10.0  # SmolLM2's outliers are >= 85x the median, ordinary rows <= 1.25x


@dataclass(frozen=True)
class OutlierRule:
    """Rows with norm > `multiple` x the median row norm are outliers; `multiple` None (or 0)
    turns the rule off."""

    multiple: float | None = DEFAULT_MULTIPLE

    def __post_init__(self) -> None:
        m = self.multiple
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))):
            raise ConfigError(f"the outlier multiple must be a number or None (off), got {m!r}")
        if m == 0:
            object.__setattr__(self, "multiple", None)
        elif m is not None and not (math.isfinite(m) and m > 1):
            raise ConfigError(f"the outlier multiple must be > 1 (times the median row norm), or 0 / None "
                              f"to turn the rule off; got {m}")
        elif m is not None:
            object.__setattr__(self, "multiple", float(m))

    @classmethod
    def parse(cls, text: str) -> OutlierRule:
        """From a command-line value: a number, or "none" / "0" / "off" for no rule."""
        if str(text).strip().lower() in ("none", "off", "0", "0.0"):
            return cls(None)
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"the outlier multiple must be a number, or none / 0 to turn the rule off; "
                              f"got {text!r}") from None
        return cls(value)

    @property
    def enabled(self) -> bool:
        return self.multiple is not None

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) bool, True for the rows of x (N, d) whose norm exceeds `multiple` x the median
        norm of these rows. All False when the rule is off, for no rows, or when the median
        norm is 0 (no scale to compare with)."""
        if x.dim() != 2:
            raise ConfigError(f"the outlier rule judges rows of an (N, d) matrix; got shape {tuple(x.shape)}")
        if not self.enabled or x.shape[0] == 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        norms = x.detach().float().norm(dim=-1)
        median = norms.median()
        return (norms > self.multiple * median) & (median > 0)

    def position_mask(self, act: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, S) bool for activations (B, S, d): the rule over the rows at positions start..
        (judged together, as evaluation rows are), False at positions before `start`."""
        out = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        if act.shape[1] > start:
            rows = act[:, start:].reshape(-1, act.shape[-1])
            out[:, start:] = self.mask(rows).view(act.shape[0], -1)
        return out

    def to_dict(self) -> dict:
        return {"multiple": self.multiple}

    @classmethod
    def from_dict(cls, data: dict) -> OutlierRule:
        if not isinstance(data, dict) or "multiple" not in data:
            raise ConfigError(f"an outlier rule is recorded as {{'multiple': number or null}}, got {data!r}")
        return cls(data["multiple"])


Rules = OutlierRule | Sequence[OutlierRule] | None  # one rule for every SAE, one per SAE, or none


def one_per(rules: Rules, n: int) -> list[OutlierRule | None]:
    """`rules` (one rule or None for all n SAEs, or a sequence of one per SAE) as a list of n."""
    if rules is None or isinstance(rules, OutlierRule):
        return [rules] * n
    rules = list(rules)
    if len(rules) != n:
        raise ConfigError(f"{len(rules)} outlier rules for {n} SAEs; give one rule, or one per SAE")
    return rules


class OutlierTally:
    """Flagged rows of a stream of batches: how many of how many, at which positions, on which
    token ids (when the batches say)."""

    def __init__(self) -> None:
        self.n_rows = self.n_flagged = 0
        self.positions: Counter = Counter()
        self.tokens: Counter = Counter()

    def update(self, mask: torch.Tensor, positions: torch.Tensor | None = None,
               tokens: torch.Tensor | None = None) -> None:
        """Add a batch's mask (N,), with each row's context position and token id if known."""
        self.n_rows += int(mask.numel())
        flagged = int(mask.sum())
        self.n_flagged += flagged
        if flagged:
            for where, counter in ((positions, self.positions), (tokens, self.tokens)):
                if where is not None:
                    counter.update(where.reshape(-1)[mask.reshape(-1).to(where.device)].tolist())

    @property
    def share(self) -> float:
        """Flagged rows / rows seen (0 when none were seen)."""
        return self.n_flagged / self.n_rows if self.n_rows else 0.0

    def top_positions(self, n: int = 10) -> list[list[int]]:
        """[[position, count], ...] most frequent first (ties: earlier position first)."""
        return [[p, c] for p, c in sorted(self.positions.items(), key=lambda pc: (-pc[1], pc[0]))[:n]]

    def top_tokens(self, n: int = 10) -> list[list[int]]:
        """[[token id, count], ...] most frequent first (ties: lower id first)."""
        return [[t, c] for t, c in sorted(self.tokens.items(), key=lambda tc: (-tc[1], tc[0]))[:n]]
