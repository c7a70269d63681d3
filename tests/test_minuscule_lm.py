"""Seed 001's minuscule LM as a named build: its shape, `load_lm("minuscule")`, `saelab models`,
and a recorded folder from another cache resolving to the name. Built small (few steps, a
slice of the corpus) with the real shape: the real build is ~2 minutes."""

import dataclasses

import pytest

import saelab.lm.default as default
from saelab.errors import ConfigError
from saelab.lm.catalog import list_models
from saelab.lm.default import LM_CONFIGS, MINUSCULE_CONFIG, built_name, named_config
from saelab.lm.resolve import load_lm, model_name_for
from saelab.sae import SAE

SMALL = dataclasses.replace(MINUSCULE_CONFIG, vocab_size=300, context_length=32, batch_size=8, steps=6,
                            warmup_steps=2, max_bytes=60_000, holdout_frac=0.2, eval_contexts=4)


def test_the_minuscule_config_has_the_notes_shape():
    cfg = LM_CONFIGS["minuscule"]
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp) == (6, 16, 64)
    assert cfg.folder_name() == "minuscule-lm-v1" and LM_CONFIGS["default"].folder_name() == "default-lm-v1"
    assert SMALL.folder_name().startswith("default-lm-v1-")  # an unnamed config keeps the hashed name
    with pytest.raises(ConfigError, match="named builds: default, minuscule"):
        named_config("tiny")


def test_load_lm_builds_the_named_config_with_its_shape_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    monkeypatch.setitem(default.LM_CONFIGS, "minuscule", SMALL)
    assert [m.status for m in list_models() if m.name == "minuscule"][0].startswith("built on first use")
    lm = load_lm("minuscule")
    assert lm.name == "minuscule" and (lm.n_layers, lm.d_model, lm.d_mlp) == (6, 16, 64)
    assert lm.hook_dim("blocks.2.mlp.hook_post") == 64 and lm.hook_dim("blocks.2.hook_resid_post") == 16
    assert (tmp_path / "models" / "minuscule-lm-v1" / "build_info.json").exists()
    entry = [m for m in list_models() if m.name == "minuscule"][0]
    assert entry.status == "ready" and entry.kind == "built" and entry.size_bytes > 0


def test_an_sae_of_the_minuscule_lm_resolves_to_it_anywhere(tmp_path):
    gone = str(tmp_path / "other-cache" / "minuscule-lm-v1")
    assert built_name(gone) == "minuscule" and built_name("default-lm-v1") == "default"
    assert built_name("pythia-lm-v1") is None and built_name("minuscule") is None
    sae = SAE(64, 8, hook_name="blocks.2.mlp.hook_post", model_name=gone)
    assert model_name_for(None, sae) == "minuscule"
    assert model_name_for("minuscule") == "minuscule" and model_name_for(gone.replace("minuscule", "default")) is None
