"""Plain-text tables of metrics for the terminal: one row per SAE, chosen columns."""

from __future__ import annotations

from typing import Sequence


def format_rows(entries: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table of the given metric columns, one row per entry."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[cell(e.get(c)) for c in columns] for e in entries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows])
