"""Feature scan and report from an activation cache (written by the real cache writer) against
the live scan of the same contexts: same examples, densities and per-token activations."""

import inspect
import math

import numpy as np
import pytest
import torch

from saelab.data.cache import cache_activations, open_cache
from saelab.errors import ConfigError, DataError
from saelab.interpret.scan import ScanConfig, scan_features
from saelab.interpret.sources import ContextSource, cache_source, example_acts, feature_acts
from saelab.interpret.report import build_report
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

HOOK, OTHER_HOOK = "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"
N, L, VOCAB, D_SAE = 20, 16, 64, 24  # conftest's tiny HF models: context 16, vocab 64


@pytest.fixture(scope="module")
def lm(tmp_path_factory, save_tiny_hf):
    return HookedLM.load(save_tiny_hf("gpt_neox", tmp_path_factory.mktemp("lm") / "tiny", seed=0))


@pytest.fixture(scope="module")
def setup(lm, tmp_path_factory):
    """SAE, contexts (BOS first) and two fp32 caches of them: BOS dropped (several shards, the
    last partial) and BOS kept."""
    torch.manual_seed(0)
    sae = SAE(lm.hook_dim(HOOK), D_SAE, arch="topk", k=4, hook_name=HOOK).eval()
    contexts = torch.randint(2, VOCAB, (N, L), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = 0
    root = tmp_path_factory.mktemp("caches")
    dropped = cache_activations(lm, contexts, [HOOK, OTHER_HOOK], root / "dropped", batch_size=3,
                                shard_contexts=6, progress=False)
    kept = cache_activations(lm, contexts, HOOK, root / "kept", drop_bos=False, progress=False)
    return sae, contexts, dropped, kept


def _assert_same_scan(a, b):
    assert a.n_tokens == b.n_tokens
    torch.testing.assert_close(a.density, b.density, rtol=0, atol=0)
    torch.testing.assert_close(a.max_act, b.max_act)
    qa, qb = a.quantiles(), b.quantiles()
    for name in ("key", "row", "pos"):
        assert torch.equal(getattr(qa, name), getattr(qb, name)), name
    torch.testing.assert_close(qa.value, qb.value)
    for j in range(D_SAE):
        ea, eb = a.top_examples(j), b.top_examples(j)
        assert [e[1:] for e in ea] == [e[1:] for e in eb]  # (row, position)
        assert [e[0] for e in ea] == pytest.approx([e[0] for e in eb], rel=1e-5)
        assert [t[:2] for t in a.top_tokens(j)] == [t[:2] for t in b.top_tokens(j)]
        assert a.act_hist(j)[1] == b.act_hist(j)[1]


def test_cache_scan_equals_live_scan_bos_dropped(lm, setup):
    """No LM given to the cache side: the scan and the examples read only the cache. Positions
    index the stored (BOS-included) contexts; position 0 is not scanned and reads 0."""
    sae, contexts, dropped, _ = setup
    cfg = ScanConfig(top_k=5, per_quantile=2)
    from_cache = cache_source(dropped, sae, lm)
    assert torch.equal(from_cache.tokens, contexts) and from_cache.start == 1
    cached = scan_features(from_cache.batches(7), sae, config=cfg, vocab_size=VOCAB, progress=False)
    live_source = ContextSource(contexts, start=1)
    live = scan_features(live_source.batches(5), sae, lm, config=cfg, progress=False)
    assert cached.n_tokens == N * (L - 1)
    _assert_same_scan(cached, live)

    with torch.no_grad():
        f = feature_acts(sae, lm, contexts)  # every position, straight from the LM
    for j in range(D_SAE):
        for act, row, pos in cached.top_examples(j):
            assert pos >= 1 and math.isclose(act, float(f[row, pos, j]), rel_tol=1e-5)
    rows, pos, feats = torch.tensor([7, 0, 19, 7]), torch.tensor([1, 5, 15, 3]), torch.tensor([0, 3, 23, 9])
    got = example_acts(cache_source(dropped, sae).encode_rows(sae), rows, pos, feats, batch_size=2)
    want = example_acts(live_source.encode_rows(sae, lm), rows, pos, feats)
    for (s1, a1), (s2, a2), r, j in zip(got, want, rows, feats):
        assert s1 == s2 == 0 and torch.isnan(a1[0])  # the BOS position: not scanned, no activation
        torch.testing.assert_close(a1, a2, equal_nan=True)
        torch.testing.assert_close(a1[1:], f[r, 1:, j])


def _close(a, b, path=""):
    """Equal JSON, floats (rounded to 4 digits on both sides) within a rounding step."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_report_from_cache_equals_live_report(lm, setup, monkeypatch):
    """BOS kept, so the live report scans the same positions; the cache report runs the LM for
    ablation only, not for the scan nor the examples' activations (feature_acts)."""
    sae, contexts, _, kept = setup
    opts = dict(features=[0, 5, 11, 17], n_ablate=1, ablate_max_back=2, batch_size=6, progress=False)
    live = build_report(sae, lm, contexts, exclude_bos=False, **opts).to_dict()
    callers, real = [], lm.run_with_cache

    def run_with_cache(*args, **kwargs):
        callers.extend(frame.function for frame in inspect.stack()[1:4])
        return real(*args, **kwargs)
    monkeypatch.setattr(lm, "run_with_cache", run_with_cache)
    cached = build_report(sae, lm, cache=kept.path, **opts).to_dict()
    assert "ablate_tokens" in callers and "feature_acts" not in callers
    assert cached["n_tokens"] == live["n_tokens"] == N * L
    assert (cached["options"]["exclude_bos"], live["options"]["exclude_bos"]) == (True, False)
    _close({**cached, "options": None}, {**live, "options": None})  # the same report by other options
    some = build_report(sae, lm, cache=kept, n_contexts=4, features=[], progress=False)
    assert some.n_tokens == 4 * L


def test_report_from_bos_dropped_cache(lm, setup):
    """Examples show the whole stored context, BOS included at activation 0, with `pos`
    indexing it; ablation (which runs the LM) ablates the token the cache says is active."""
    sae, contexts, dropped, _ = setup
    rep = build_report(sae, lm, cache=dropped, features=[2, 9], n_ablate=1, ablate_max_back=3,
                       progress=False).to_dict()
    assert rep["n_tokens"] == N * (L - 1)
    with torch.no_grad():
        f = feature_acts(sae, lm, contexts)
    vocab = [lm.tokenizer.decode([t]) for t in range(VOCAB)]
    for j in (2, 9):
        entry = rep["features"][j]
        for ex in entry["examples"] + [e for q in entry["quantiles"] for e in q["examples"]]:
            assert ex["tokens"] == [vocab[t] for t in contexts[ex["context"]].tolist()]
            assert ex["pos"] >= 1 and ex["acts"][0] is None and ex["excluded"] == [0]  # BOS: excluded, not 0
            assert ex["acts"][1:] == pytest.approx(f[ex["context"], 1:, j].tolist(), rel=2e-3, abs=1e-6)
        for abl in entry["ablation"]:
            q = abl.get("quantile")
            ex = (entry["examples"] if q is None else entry["quantiles"][q]["examples"])[abl["example"]]
            assert abl["pos"] == ex["pos"] and abl["base_act"] == pytest.approx(ex["act"], rel=2e-3)


def test_cache_of_another_model_or_hook_is_an_error(lm, setup, save_tiny_hf, tmp_path):
    sae, contexts, dropped, kept = setup
    other = HookedLM.load(save_tiny_hf("gpt_neox", tmp_path / "other", seed=1))
    with pytest.raises(DataError, match=r"was made from model .* not .*other weights"):
        build_report(sae, other, cache=kept.path, features=[], progress=False)
    no_hook = SAE(lm.hook_dim(OTHER_HOOK), 8, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(DataError, match=r"no activations for \['blocks.0.hook_resid_post'\]; "
                                        r"it holds \['blocks.1.hook_resid_post', 'blocks.0.hook_mlp_out'\]"):
        build_report(no_hook, lm, cache=dropped, features=[], progress=False)
    with pytest.raises(ConfigError, match="not both"):
        build_report(sae, lm, contexts, cache=kept, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        build_report(sae, lm, cache=kept, acts=[], progress=False)
    with pytest.raises(DataError, match="holds 20 and 0 were asked"):
        cache_source(kept, sae, lm, n_contexts=0)


def test_context_activations_in_any_order(setup):
    _, contexts, dropped, _ = setup
    cache = open_cache(dropped.path)
    ids = [13, 2, 19, 2, 6]
    got = cache.context_activations(ids, OTHER_HOOK)
    rows = torch.cat([cache.load_contexts(np.array([i]), [OTHER_HOOK])[0] for i in ids])
    assert got.shape == (5, L - 1, cache.dim(OTHER_HOOK)) and got.dtype == torch.float32
    assert torch.equal(got.reshape(-1, got.shape[-1]), rows)
    assert torch.equal(cache.context_tokens(ids), contexts[ids])
    with pytest.raises(DataError, match="no context indices"):
        cache.context_activations([], HOOK)
    with pytest.raises(DataError, match=r"0\.\.19"):
        cache.context_activations([20], HOOK)
