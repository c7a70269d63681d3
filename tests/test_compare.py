"""MMCS between dictionaries (saelab compare): against cosines computed pair by pair."""

import json

import pytest
import torch

from saelab.cli import main
from saelab.errors import ConfigError
from saelab.experiments.compare import CompareConfig, compare_dictionaries, directions, format_matrix
from saelab.sae import SAE


def _sae(d_sae: int, seed: int) -> SAE:
    torch.manual_seed(seed)
    return SAE(8, d_sae, arch="topk", k=2, hook_name="blocks.0.hook_resid_post")


def test_pairs_match_brute_force_cosines():
    small, big = _sae(6, 0), _sae(10, 1)
    with torch.no_grad():  # the big one contains the small one's directions (scaled), plus others
        big.W_dec[:6] = 3 * small.W_dec
    entries = compare_dictionaries({"small": small, "big": big}, CompareConfig(threshold=0.9))
    assert [(e["reference"], e["learned"]) for e in entries] == [("small", "big"), ("big", "small")]
    found, back = entries
    assert found["mmcs"] == pytest.approx(1.0, abs=1e-6) and found["shared"] == 1.0
    cos = [[torch.nn.functional.cosine_similarity(b, s, dim=0).item() for s in small.W_dec] for b in big.W_dec]
    best = torch.tensor([max(row) for row in cos])
    assert back["mmcs"] == pytest.approx(best.mean().item(), abs=1e-6)
    assert back["shared"] == pytest.approx((best > 0.9).float().mean().item())
    assert (back["d_ref"], back["d_learned"]) == (10, 6)


def test_encoder_directions_and_bad_config():
    sae = _sae(6, 0)
    assert torch.equal(directions(sae, "encoder"), sae.W_enc.detach().T)
    with pytest.raises(ConfigError, match="vectors must be one of"):
        CompareConfig(vectors="both")
    with pytest.raises(ConfigError, match="threshold"):
        CompareConfig(threshold=2.0)


def test_matrix_and_command(tmp_path, capsys):
    run = tmp_path / "run"
    for d_sae, seed in ((6, 0), (12, 1)):
        _sae(d_sae, seed).save(run / "saes" / f"topk_{d_sae}")
    assert main(["compare", str(run)]) == 0
    text = capsys.readouterr().out
    data = json.loads((run / "compare.json").read_text())
    assert set(data["saes"]) == {"topk_6", "topk_12"} and len(data["pairs"]) == 2
    assert format_matrix(data["pairs"], ["topk_12", "topk_6"]) in text
    pair = data["pairs"][0]
    assert f"{pair['mmcs']:.3f}" in text
