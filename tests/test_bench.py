"""`python -m bench` keeps working: one module's quick rows have the shape every module's must."""

from __future__ import annotations

import json
import math

import pytest

from bench import ROW_KEYS, row
from bench.__main__ import MODULES, main, table


def test_row_ratio_is_value_over_reference():
    r = row("x", 30.0, "tokens/s", "roofline", 40.0)
    assert r["ratio"] == pytest.approx(0.75) and tuple(r) == ROW_KEYS
    assert row("x", 1.0, "u", "absent")["ratio"] is None


def test_quick_training_rows(tmp_path, capsys):
    """The training module, quick shapes: every row has the keys, types and a consistent ratio;
    the table printed and the JSON written hold the same rows."""
    assert "train_throughput" in MODULES
    out = tmp_path / "bench.json"
    main(["--quick", "--only", "train_throughput", "--json", str(out), "--threads", "1"])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["row"].split(",")[0] for r in rows} >= {f"train {a}" for a in ("relu", "topk", "batchtopk", "jumprelu")}
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert isinstance(r["row"], str) and isinstance(r["unit"], str) and isinstance(r["note"], str)
        assert isinstance(r["value"], float) and r["value"] > 0 and math.isfinite(r["value"])
        if r["reference_value"] is not None:
            assert r["ratio"] == pytest.approx(r["value"] / r["reference_value"])
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    assert data["machine"]["torch_threads"] == 1 and data["quick"] is True
    assert table(rows) in capsys.readouterr().out
