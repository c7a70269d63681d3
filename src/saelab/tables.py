"""Text tables of results for the terminal and for Markdown reports: one function, one row per
entry, chosen columns.

A column is a key, or a `Column(key, header, fmt)`: `fmt` is a format spec for numbers (".3f",
"+.4f", "d") or a function value -> str. Rows are dicts or anything with `.get(key)` (a
metrics.json row, `saelab.evals.entry.MetricsEntry`, reads like its JSON entry). A missing
value prints as "-", a NaN as "nan"; strings are printed as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from saelab.errors import ConfigError

STYLES = ("plain", "markdown")


@dataclass(frozen=True)
class Column:
    key: str
    header: str | None = None  # default: the key
    fmt: str | Callable[[object], str] = ".4g"  # for floats; ints print whole unless fmt says

    @property
    def title(self) -> str:
        return self.key if self.header is None else self.header

    def cell(self, value) -> str:
        if value is None:
            return "-"
        if callable(self.fmt):
            return self.fmt(value)
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, int) and self.fmt == ".4g":
            return str(value)
        return format(value, self.fmt)


def format_rows(entries: Sequence, columns: Sequence[str | Column], style: str = "plain") -> str:
    """A table of the given columns, one row per entry.

    plain: fixed-width, the first column left-aligned, the others right-aligned, a rule of
    dashes under the header. markdown: a GitHub-flavoured Markdown table."""
    if style not in STYLES:
        raise ConfigError(f"style must be one of {STYLES}, got {style!r}")
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    rows = [[c.cell(e.get(c.key)) for c in cols] for e in entries]
    titles = [c.title for c in cols]
    if style == "markdown":
        lines = [titles, ["---"] * len(cols), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max([len(t), *(len(r[i]) for r in rows)]) for i, t in enumerate(titles)]

    def line(cells: list[str]) -> str:
        return "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(titles), line(["-" * w for w in widths])] + [line(r) for r in rows])
