"""NaN and Inf never pass silently through evaluation: refused with the hook and position."""

import pytest
import torch

from saelab.errors import DataError
from saelab.evals.reconstruction import PerSAE, RowsAt, evaluate_on_lm, evaluate_saes
from saelab.interpret.sources import hook_acts
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

HOOK = "blocks.0.hook_resid_post"


def test_evaluate_saes_names_the_hook_and_the_row(tmp_path):
    sae = SAE(4, 8, hook_name="blocks.1.hook_mlp_out")
    batches = [torch.randn(10, 4), torch.randn(10, 4)]
    batches[1][6, 2] = float("inf")
    with pytest.raises(DataError, match=r"activations at blocks.1.hook_mlp_out hold NaN or Inf \(0 NaN, 1 Inf in 1 of 10 "
                                        r"rows of this batch\), the first at row 16 of the evaluation rows"):
        evaluate_saes([sae], batches)
    transcoder = SAE(4, 8, d_out=3, hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    y = torch.randn(10, 3)
    y[2, 0] = float("nan")
    at = RowsAt(torch.arange(10) % 5 + 1, torch.zeros(10, dtype=torch.long), torch.arange(10) // 5 + 7)
    with pytest.raises(DataError, match=r"at blocks.0.hook_mlp_out .* the first at context 7, position 3;"):
        evaluate_saes([transcoder], [PerSAE([(torch.randn(10, 4), y)], at)])


def test_evaluate_on_lm_names_the_hook_context_and_position(tiny_hf_model_dirs):
    lm = HookedLM.load(tiny_hf_model_dirs["gpt2"])
    tokens = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    sae = SAE(lm.d_model, 16, hook_name=HOOK)

    def poison(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[0] == 2 and hidden.shape[1] == 12:  # the second batch of 4 + 2 contexts
            hidden = hidden.clone()
            hidden[0, 7, 3] = float("nan")  # context 4, position 7
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = lm.blocks[0].register_forward_hook(poison)
    try:
        with pytest.raises(DataError, match=rf"activations at {HOOK} hold NaN or Inf .* context 4, position 7;"):
            evaluate_on_lm(lm, [sae], tokens, batch_size=4, downstream=False)
    finally:
        handle.remove()
    assert evaluate_on_lm(lm, [sae], tokens, batch_size=4, downstream=False)[0].recon.n_tokens == 6 * 11


def test_the_feature_scan_names_the_context_and_position():
    sae = SAE(4, 8, hook_name=HOOK)
    acts = torch.randn(3, 5, 4)
    acts[2, 1, 0] = float("nan")
    with pytest.raises(DataError, match=rf"{HOOK} .* the first at context 12, position 2;"):
        hook_acts(sae, acts=acts, start=1, rows=torch.tensor([10, 11, 12]))
