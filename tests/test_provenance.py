"""Provenance: an SAE records the text, context length, BOS and outlier rules it was trained with
(saelab's metadata and SAELens's keys), and the commands that run it on text default to them;
an option typed wins, and SAEs that record nothing get the commands' own defaults."""

import json

import pytest
import torch

import saelab.commands.connections as connections_command
import saelab.commands.dashboard as dashboard_command
import saelab.commands.options as options
from saelab.cli import main
from saelab.data.outliers import OutlierRule
from saelab.data.provenance import Provenance, rule_for
from saelab.errors import ConfigError
from saelab.sae import SAE
from saelab.sae.format import CFG_FILE
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.spec import TrainSpec

HOOK = "blocks.0.hook_resid_post"
RECORDED = Provenance(source="stdlib-docs", context_length=24, prepend_bos=True, exclude_bos=True,
                      outliers=OutlierRule(20))


def test_provenance_reads_back_and_defaults_to_nothing():
    sae = SAE(8, 16, hook_name=HOOK)
    assert Provenance.of(sae) == Provenance() and rule_for(sae) == OutlierRule()  # old SAEs: the default rule
    sae.cfg.metadata["provenance"] = RECORDED.to_dict()
    assert Provenance.of(sae) == RECORDED and rule_for(sae) == OutlierRule(20)
    assert rule_for(sae, OutlierRule(None)) == OutlierRule(None)  # given wins, "off" included
    with pytest.raises(ConfigError, match="unknown provenance"):
        Provenance.from_dict({"corpus": "x"})


def test_trained_sae_records_its_text_in_cfg_json(tmp_path):
    spec = TrainSpec(arch="topk", d_sae=16, k=2, warmup_steps=1)
    trainer = GroupTrainer([spec], 8, tmp_path, TrainConfig(total_steps=2, outlier_multiple=20), hook_name=HOOK,
                           provenance=Provenance(source="hf:wikitext", context_length=24, prepend_bos=True,
                                                 exclude_bos=True))
    [trained] = trainer.fit([torch.randn(64, 8)] * 2).trained
    cfg = json.loads((trained.path / CFG_FILE).read_text())
    assert cfg["dataset_path"] == cfg["metadata"]["dataset_path"] == "wikitext"  # SAELens's keys
    assert cfg["context_size"] == cfg["metadata"]["context_size"] == 24 and cfg["metadata"]["prepend_bos"] is True
    assert cfg["metadata"]["saelab"]["metadata"]["provenance"] == {
        "source": "hf:wikitext", "context_length": 24, "prepend_bos": True, "exclude_bos": True,
        "outliers": {"multiple": 20.0}}
    assert Provenance.of(SAE.load(trained.path)).outliers == OutlierRule(20)
    old = SAE(8, 16, hook_name=HOOK).save(tmp_path / "old")
    cfg = json.loads((old / CFG_FILE).read_text())
    assert cfg["dataset_path"] is None and cfg["context_size"] is None and cfg["metadata"]["prepend_bos"] is True


# ---- commands ------------------------------------------------------------------------------------
@pytest.fixture
def saes(tiny_lm, tiny_lm_path, tmp_path):
    """Two SAE folders on the tiny LM: one recording its text (RECORDED), one recording nothing."""
    made = {}
    for name, prov in (("recorded", RECORDED), ("old", None)):
        sae = SAE(tiny_lm.d_model, 16, hook_name=HOOK, model_name=str(tiny_lm_path))
        if prov is not None:
            sae.cfg.metadata["provenance"] = prov.to_dict()
        made[name] = sae.save(tmp_path / name)
    return made


@pytest.fixture
def asked(monkeypatch, tiny_lm):
    """The held-out text the commands ask for: (source, n_contexts, context_length) per call."""
    calls = []

    def heldout(lm, source, n_contexts, context_length=None, **kw):
        calls.append((source, n_contexts, context_length))
        return torch.randint(3, 200, (n_contexts, context_length or 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(options, "heldout_contexts", heldout)
    return calls


def test_perturb_and_prune_read_the_recorded_text(saes, asked, tmp_path):
    common = ["--eval-contexts", "2", "--out"]
    assert main(["perturb", str(saes["recorded"]), "--cos", "0.9", *common, str(tmp_path / "p1")]) == 0
    assert main(["prune", str(saes["recorded"]), "--target-l0", "4", *common, str(tmp_path / "q1")]) == 0
    assert asked == [("stdlib-docs", 2, 24)] * 2
    perturbed = json.loads((tmp_path / "p1" / "perturb.json").read_text())
    assert perturbed["outlier_multiple"] == 20.0 and perturbed["config"]["exclude_bos"] is True
    assert json.loads((tmp_path / "q1" / "metrics.json").read_text())[0]["outlier_multiple"] == 20.0
    asked.clear()  # typed options win
    assert main(["perturb", str(saes["recorded"]), "--cos", "0.9", "--source", "stdlib", "--context-length", "16",
                 "--outlier-multiple", "none", *common, str(tmp_path / "p2")]) == 0
    assert asked == [("stdlib", 2, 16)]
    assert json.loads((tmp_path / "p2" / "perturb.json").read_text())["outlier_multiple"] is None
    asked.clear()  # an SAE that records nothing: the commands' defaults
    assert main(["perturb", str(saes["old"]), "--cos", "0.9", *common, str(tmp_path / "p3")]) == 0
    assert asked == [("stdlib", 2, None)]
    assert json.loads((tmp_path / "p3" / "perturb.json").read_text())["outlier_multiple"] == 10.0


def test_dashboard_reads_each_saes_recorded_text(saes, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(dashboard_command, "build_report", lambda folder, lm, **kw: built.append(kw) or "report")
    monkeypatch.setattr(dashboard_command, "write_dashboard", lambda report, out, **kw: out)
    for name in ("recorded", "old"):
        assert main(["dashboard", str(saes[name])]) == 0
    assert main(["dashboard", str(saes["recorded"]), "--source", "stdlib", "--outlier-multiple", "0"]) == 0
    got = [(kw["corpus"], kw["context_length"], kw["exclude_bos"], kw["outliers"]) for kw in built]
    assert got == [("stdlib-docs", 24, True, OutlierRule(20)), ("stdlib", 128, True, OutlierRule()),
                   ("stdlib", 24, True, OutlierRule(None))]


def test_connections_reads_lates_recorded_text(saes, monkeypatch, tmp_path):
    """EARLY and LATE at one hook are allowed (EARLY's output is LATE's input); the text settings
    come from LATE, as typed options override them."""
    asked, configs = [], []

    def heldout(lm, source, n_contexts, context_length=None, **kw):
        asked.append((source, n_contexts, context_length))
        return torch.randint(3, 200, (n_contexts, context_length), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(connections_command, "heldout_contexts", heldout)
    monkeypatch.setattr(connections_command, "run_connections", lambda lm, e, l, ctx, cfg, **kw: configs.append(cfg))
    monkeypatch.setattr(connections_command, "write_outputs", lambda result, out: out / "index.html")
    monkeypatch.setattr(connections_command, "format_text", lambda result: "")
    for late, typed in (("recorded", []), ("old", []), ("recorded", ["--source", "stdlib", "--outlier-multiple", "0"])):
        assert main(["connections", str(saes["old"]), str(saes[late]), "--eval-contexts", "2", *typed,
                     "--out", str(tmp_path / "c")]) == 0
    assert [a[0] for a in asked] == ["stdlib-docs", "stdlib", "stdlib"]
    assert [a[2] for a in asked][::2] == [24, 24] and asked[1][2] != 24
    assert [(c.outlier_multiple, c.exclude_bos) for c in configs] == [(20.0, True), (10.0, True), (None, True)]


def test_help_says_the_default_is_the_saes(capsys):
    for command in ("dashboard", "perturb", "prune", "connections"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--source SOURCE text:" in text and "(default: the SAE's recorded one, else stdlib)" in text
        assert "--outlier-multiple X" in text and "the SAE's recorded one, else 10.0" in text
