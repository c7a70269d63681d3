"""One rule picks the LM a command runs (saelab.lm.resolve): asked-for model, else the SAE's."""

import os
import subprocess
import sys

from saelab.errors import MissingFileError
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import model_name_for, load_lm
from saelab.sae import SAE


def _sae(model_name):
    return SAE(32, 8, hook_name="blocks.0.hook_resid_post", model_name=model_name)


def test_names(tmp_path):
    gone = str(tmp_path / "old-cache" / "default-lm-v1")
    assert model_name_for(None, None) is None and model_name_for("default", _sae("x/y")) is None
    assert model_name_for(None, _sae(gone)) is None  # a default LM built elsewhere: ours stands in
    assert model_name_for(None, _sae("EleutherAI/pythia-70m-deduped")) == "EleutherAI/pythia-70m-deduped"
    assert model_name_for("gpt2", _sae("EleutherAI/pythia-70m-deduped")) == "gpt2"
    assert model_name_for(None, _sae(None)) is None


def test_folders(tiny_lm_path, tiny_lm):
    assert load_lm(tiny_lm) is tiny_lm
    assert load_lm(str(tiny_lm_path)).name == str(tiny_lm_path)
    lm = load_lm(None, _sae(str(tiny_lm_path)))  # the SAE's own model, not the default LM
    assert isinstance(lm, HookedLM) and lm.name == str(tiny_lm_path)


def test_an_sae_naming_a_hub_model_loads_that_model_or_fails_clearly():
    """Offline (set before Hugging Face is imported, hence the child process), an SAE trained
    on a hub model must not silently fall back to the default LM."""
    code = ("from saelab.lm.resolve import load_lm\n"
            "from saelab.sae import SAE\n"
            "sae = SAE(32, 8, hook_name='blocks.0.hook_resid_post', model_name='nobody-here/no-model')\n"
            "try:\n    load_lm(None, sae)\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith(MissingFileError.__name__) and "nobody-here/no-model" in out and "not a local folder" in out


def test_dtype_casts_a_folder_model_and_the_default_lm(tiny_lm_path, monkeypatch):
    """`dtype` reaches both branches: HookedLM.load for a folder, a cast for the default LM."""
    import pytest
    import torch

    from saelab.errors import ConfigError
    from saelab.lm import default

    assert load_lm(str(tiny_lm_path), dtype="bfloat16").W_E.dtype == torch.bfloat16
    monkeypatch.setattr(default, "load_default_lm", lambda device="cpu": HookedLM.load(tiny_lm_path, device=device))
    lm = load_lm(None, dtype="float16")
    assert lm.W_E.dtype == torch.float16 and lm.W_U.dtype == torch.float16
    assert load_lm(None).W_E.dtype == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_lm(str(tiny_lm_path), dtype="float8")
