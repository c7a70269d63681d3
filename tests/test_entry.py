"""The metrics.json row: the flat keys it writes (what plots, tables, `prune --compare` and the
dashboard read), reading it back, and the one writer's guarantees."""

import json
import math

import pytest
import torch

from saelab.errors import ConfigError, CorruptFileError, MissingFileError
from saelab.evals.entry import (
    Ablation, DownstreamMetrics, Extra, MetricsEntry, read_metrics, recovered_key, write_metrics,
)
from saelab.evals.metrics import MetricsAccumulator

# the keys of an LM sweep's metrics.json row, in order (train_tokens and timings are the sweep's own)
LM_ROW_KEYS = [
    "name", "n_tokens", "mse", "fvu", "explained_variance", "cos", "l0", "l1", "d_sae", "dead", "dense",
    "dense_threshold", "density_hist_counts", "density_hist_edges", "ce_clean", "ce_sae", "kl", "ce_delta",
    "ce_zero", "kl_zero", "loss_recovered", "ce_mean", "kl_mean", "loss_recovered_mean", "downstream_tokens",
    "exclude_bos", "splice_hook", "spec",
]


def recon():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen)
    f = torch.relu(torch.randn(50, 6, generator=gen))
    return MetricsAccumulator().update(x, x + 0.1, f).result()


def downstream():
    return DownstreamMetrics(ce_clean=3.0, ce_sae=3.25, kl=0.2, downstream_tokens=45, exclude_bos=True,
                             splice_hook="blocks.0.hook_resid_post",
                             ablations={"zero": Ablation(5.0, 1.5, 0.875), "mean": Ablation(4.0, 0.9, 0.75)})


class Recovery:
    def to_dict(self):
        return {"mmcs": 0.5, "recovered": 0.25}


def test_row_flattens_to_the_metrics_json_keys():
    row = MetricsEntry("relu_64_c1", recon(), downstream(), spec={"arch": "relu"}, extra=[Recovery()])
    flat = row.to_dict()
    assert list(flat) == LM_ROW_KEYS + ["mmcs", "recovered"]
    assert flat["ce_delta"] == 0.25 and flat["loss_recovered"] == 0.875 and flat["loss_recovered_mean"] == 0.75
    assert flat["ce_zero"] == 5.0 and flat["kl_mean"] == 0.9 and flat["mmcs"] == 0.5
    assert row["l0"] == flat["l0"] == row.recon.l0 and row.get("nope", 7) == 7
    with pytest.raises(KeyError, match="not a column"):
        row["nope"]
    assert list(MetricsEntry("x", recon()).to_dict()) == LM_ROW_KEYS[:14]  # no LM, no spec: no such keys
    assert recovered_key("zero") == "loss_recovered" and recovered_key("mean") == "loss_recovered_mean"


def test_rows_read_back_as_written(tmp_path):
    rows = [MetricsEntry("a", recon(), downstream(), spec={"arch": "topk", "k": 4}, extra=[Recovery()]),
            MetricsEntry("b", recon(), extra=[Extra({"n_killed": 0, "density_cutoff": None})])]
    path = write_metrics(tmp_path, rows)
    assert path == tmp_path / "metrics.json" and not list(tmp_path.glob(".*tmp"))  # atomic: no temp left
    back = read_metrics(tmp_path)
    assert [r.to_dict() for r in back] == json.loads(path.read_text()) == [r.to_dict() for r in rows]
    assert back[0].downstream == downstream() and back[0].spec == {"arch": "topk", "k": 4}
    assert back[0].extra[0].to_dict() == {"mmcs": 0.5, "recovered": 0.25} and back[1].downstream is None
    nan = MetricsEntry("nan", recon(), DownstreamMetrics(3.0, 3.0, 0.0, {"zero": Ablation(3.0, 0.0, math.nan)}, 1,
                                                         False, "h"))
    write_metrics(tmp_path, [nan])
    assert math.isnan(read_metrics(tmp_path)[0].downstream.loss_recovered)  # a broken ratio stays NaN


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"would overwrite \['l0'\]"):
        MetricsEntry("a", recon(), extra=[Extra({"l0": 1.0})]).to_dict()
    with pytest.raises(MissingFileError, match="has no metrics.json"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('{"name": "not a list"}')
    with pytest.raises(CorruptFileError, match="not a metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('[{"name": "no metrics"}]')
    with pytest.raises(CorruptFileError):
        read_metrics(tmp_path)


def test_loss_recovered_is_a_percent_in_every_table_and_a_fraction_in_json():
    from saelab.evals.entry import OUTLIER_COLUMNS, recovered_column
    from saelab.tables import format_rows

    row = {"name": "a", "loss_recovered": 0.91234, "loss_recovered_all": 0.5, "outliers": 3, "fvu_all": 0.1}
    text = format_rows([row], ["name", recovered_column()] + list(OUTLIER_COLUMNS))
    assert text.splitlines()[2].split() == ["a", "91.2%", "3", "0.1", "50.0%"]
    assert format_rows([{"loss_recovered": float("nan")}], [recovered_column()]).splitlines()[2].strip() == "nan"
