"""saelab steer: the splice adds exactly scale * W_dec[i] (checked against a plain torch hook on
the HF module), scale 0 is the unsteered model bit for bit, the probability changes are the
softmaxes' difference, and bad input is a one-line error."""

import json

import pytest
import torch

from saelab.errors import ConfigError, DataError
from saelab.experiments.steer import (SteerConfig, feature_direction, generate, probability_changes, prompt_ids,
                                      run_steer, steering_splice)
from saelab.sae import SAE

PROMPT = "def main(args):\n    return"


@pytest.fixture(scope="module")
def sae(tiny_lm):
    torch.manual_seed(0)
    return SAE(tiny_lm.d_model, 64, hook_name="blocks.0.hook_resid_post").eval()


@pytest.fixture(scope="module")
def transcoder(tiny_lm):
    torch.manual_seed(1)
    return SAE(tiny_lm.d_model, 48, d_out=tiny_lm.d_model, hook_name="blocks.1.ln2.hook_normalized",
               hook_name_out="blocks.1.hook_mlp_out").eval()


@pytest.mark.parametrize("which", ["sae", "transcoder"])
def test_splice_adds_exactly_the_scaled_decoder_row(tiny_lm, sae, transcoder, which):
    model = sae if which == "sae" else transcoder
    block = tiny_lm.blocks[0] if which == "sae" else tiny_lm.blocks[1].get_submodule(tiny_lm.arch.mlp)
    hook = model.cfg.hook_name_out or model.cfg.hook_name
    direction, scale = feature_direction(model, 5), 3.5
    ids = prompt_ids(tiny_lm, PROMPT, 4)

    def plain(_module, _args, output):  # the same edit as a plain torch forward hook on the HF module
        act = output[0] if isinstance(output, tuple) else output
        new = act + scale * direction
        return (new, *output[1:]) if isinstance(output, tuple) else new
    handle = block.register_forward_hook(plain)
    try:
        expected = tiny_lm.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    splices = {hook: steering_splice(direction, scale)}
    assert torch.equal(tiny_lm.forward(ids, splices), expected)
    # and the activation the model used is the clean one plus scale * W_dec[5] at every position
    clean = tiny_lm.run_with_cache(ids, [hook])[hook]
    steered = tiny_lm.run_with_cache(ids, [hook], splices=splices)[hook]
    assert torch.equal(steered, clean + scale * model.W_dec[5])
    assert not torch.equal(expected, tiny_lm.forward(ids))


def test_scale_zero_is_the_unsteered_model(tiny_lm, sae):
    ids = prompt_ids(tiny_lm, PROMPT, 6)
    zero = {sae.cfg.hook_name: steering_splice(feature_direction(sae, 3), 0.0)}
    for temperature in (0.0, 1.5):
        steered, plain = (generate(tiny_lm, ids, sp, 6, temperature, seed=7)[0] for sp in (zero, {}))
        assert steered == plain
    assert torch.equal(generate(tiny_lm, ids, zero, 1)[1], tiny_lm.forward(ids)[0, -1])
    result = run_steer(tiny_lm, sae, SteerConfig(feature=3, scales=[0.0, 40.0], prompt=PROMPT, max_new_tokens=6))
    at_zero, far = result.steered
    assert at_zero.token_ids == result.unsteered_ids and at_zero.text == result.unsteered
    assert all(c.change == 0.0 for c in at_zero.increases + at_zero.decreases)
    assert far.increases[0].change > 0 > far.decreases[0].change


def test_probability_changes_are_the_softmax_difference():
    gen = torch.Generator().manual_seed(0)
    before, after = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    up, down = probability_changes(before, after, None, top=5)
    p0, p1 = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
    for c in up + down:
        assert c.p_before == float(p0[c.token_id]) and c.p_after == float(p1[c.token_id])
        assert c.change == pytest.approx(c.p_after - c.p_before, abs=1e-15)
    delta = p1 - p0
    assert [c.token_id for c in up] == delta.argsort(descending=True)[:5].tolist()
    assert [c.token_id for c in down] == delta.argsort()[:5].tolist()
    assert float(delta.sum()) == pytest.approx(0.0, abs=1e-12)  # what one token gains another loses


def test_run_steer_writes_json_and_plot(tiny_lm, sae, tmp_path):
    from saelab.experiments.steer import format_steer

    cfg = SteerConfig(feature=2, scales=[-20.0, 20.0], prompt=PROMPT, max_new_tokens=5, top=3)
    result = run_steer(tiny_lm, sae, cfg, tmp_path)
    saved = json.loads((tmp_path / "steer.json").read_text())
    assert saved["direction_norm"] == pytest.approx(float(sae.W_dec[2].detach().norm()))
    assert [s["scale"] for s in saved["steered"]] == [-20.0, 20.0] and len(saved["steered"][0]["increases"]) == 3
    assert saved["curve_scales"] == [-20.0, 0.0, 20.0] and all(len(p) == 3 for p in saved["curves"].values())
    assert (tmp_path / "steer.png").stat().st_size > 0
    text = format_steer(result)
    assert "unsteered" in text and "scale 20" in text and "p before" in text


def test_bad_input(tiny_lm, sae):
    with pytest.raises(ConfigError, match=r"feature 64 is out of range: this SAE has features 0..63"):
        feature_direction(sae, 64)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        SteerConfig(feature=0, scales=[1.0], prompt="  ")
    with pytest.raises(DataError, match="the model's context is 32"):
        prompt_ids(tiny_lm, " ".join(["word"] * 40), 4)
    with pytest.raises(DataError, match=r"with BOS\) and --max-new-tokens 30"):
        prompt_ids(tiny_lm, PROMPT, 30)


def test_cli(tiny_lm_path, sae, tmp_path, capsys):
    from saelab.cli import main

    path = sae.save(tmp_path / "sae")
    common = ["steer", str(path), "--model", str(tiny_lm_path), "--prompt", PROMPT]
    out_dir = ["--out", str(tmp_path / "out")]
    assert main(common + ["--feature", "1", "--scale", "0", "8", "--max-new-tokens", "4", *out_dir]) == 0
    out = capsys.readouterr().out
    assert "scale 8" in out and (tmp_path / "out" / "steer.json").exists()
    assert main(common + ["--feature", "999", "--scale", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: feature 999 is out of range")
    with pytest.raises(SystemExit) as exit_:
        main(common + ["--feature", "1", "--scale", "big"])
    assert exit_.value.code == 2 and "invalid float value: 'big'" in capsys.readouterr().err
