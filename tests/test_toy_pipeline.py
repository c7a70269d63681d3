import json

import torch

from saelab.cli import main
from saelab.data.toy import ToyDataSource
from saelab.pipelines.toy import Recovery, ground_truth_recovery
from saelab.sae import SAE


def test_ground_truth_recovery_of_the_true_dictionary():
    src = ToyDataSource(d=8, n_features=20, batch_size=4)
    sae = SAE(8, 20)
    with torch.no_grad():
        sae.W_dec.copy_(src.features[torch.randperm(20)] * 3.0)
    assert ground_truth_recovery(sae, src.features) == Recovery(mmcs=1.0, recovered=1.0)
    with torch.no_grad():
        sae.W_dec.copy_(-src.features)
    assert ground_truth_recovery(sae, src.features).recovered < 0.5


def test_toy_command_recovers_features(tmp_path, capsys):
    """A small version of `saelab toy`: topk at the true L0 recovers most ground-truth features."""
    out = tmp_path / "toy"
    code = main(["toy", "--out", str(out), "--d", "16", "--n-features", "32", "--mean-active", "3", "--width", "32",
                 "--l1", "0.3", "--k", "3", "--steps", "400", "--batch-tokens", "256"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MMCS" in printed and "topk_32_k3" in printed
    metrics = {m["name"]: m for m in json.loads((out / "metrics.json").read_text())}
    assert metrics["topk_32_k3"]["mmcs"] > 0.85
    assert metrics["relu_32_c0.3"]["mmcs"] > 0.7
    assert (out / "saes" / "topk_32_k3" / "cfg.json").exists()
    config = json.loads((out / "config.json").read_text())  # one config file, the toy data's included
    assert config["pipeline"]["data"]["n_features"] == 32 and config["pipeline"]["width"] == 32
    assert not (out / "toy_data.json").exists()
