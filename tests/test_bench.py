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


@pytest.mark.slow
def test_gpu_rows_dry_run_on_cpu(tmp_path):
    """`python -m bench --gpu` has never had a GPU here: its rows (bf16 autocast, torch.compile,
    the stacked sweep on the device) run on the CPU as a dry run, so a lent GPU's minutes go to
    measuring, not to fixing the path. Quick shapes; the figures mean nothing."""
    out = tmp_path / "gpu.json"
    main(["--gpu", "--device", "cpu", "--quick", "--json", str(out), "--threads", "1"])
    data = json.loads(out.read_text())
    names = [r["row"] for r in data["rows"]]
    assert data["gpu_rows_on"] == "cpu"
    assert any(n.startswith("train relu,") and n.endswith("bf16 autocast, compiled") for n in names)
    assert any(n.startswith("train topk,") and n.endswith("bf16 autocast, compiled") for n in names)
    assert {f"sweep_batched.{a}_vs_separate" for a in ("relu", "topk")} <= set(names)
    assert all(r["value"] > 0 and math.isfinite(r["value"]) for r in data["rows"])


def test_gpu_rows_without_cuda_say_so(capsys):
    """--gpu on a machine without CUDA stops with a message naming the dry run, not a traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as stop:
        main(["--gpu", "--quick"])
    assert stop.value.code == 2 and "--device cpu" in capsys.readouterr().err


def test_device_without_gpu_is_refused(capsys):
    """--device only places the --gpu rows; alone it would be silently ignored, so it is refused."""
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu", "--quick"])
    assert stop.value.code == 2 and "--gpu" in capsys.readouterr().err
