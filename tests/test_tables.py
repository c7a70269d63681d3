"""The one table formatter: plain (terminal) and Markdown, per-column formats."""

import pytest

from saelab.errors import ConfigError
from saelab.tables import Column, format_rows

ROWS = [{"name": "relu_64_c1", "l0": 12.3456, "dead": 3, "kl": None},
        {"name": "topk", "l0": float("nan"), "dead": 0, "kl": 0.5, "extra": "ignored"}]


def test_plain_table_aligns_columns():
    assert format_rows(ROWS, ["name", "l0", "dead", "kl"]).splitlines() == [
        "name           l0  dead   kl",
        "----------  -----  ----  ---",
        "relu_64_c1  12.35     3    -",
        "topk          nan     0  0.5",
    ]


def test_markdown_table_with_headers_and_formats():
    cols = [Column("name", "SAE"), Column("l0", "L0", ".1f"), Column("kl", "KL", lambda v: f"{v:.0%}")]
    assert format_rows(ROWS, cols, style="markdown").splitlines() == [
        "| SAE | L0 | KL |", "| --- | --- | --- |", "| relu_64_c1 | 12.3 | - |", "| topk | nan | 50% |"]


def test_no_rows_and_bad_style():
    assert format_rows([], ["name", "l0"]) == "name  l0\n----  --"
    with pytest.raises(ConfigError, match="style must be one of"):
        format_rows(ROWS, ["name"], style="html")
