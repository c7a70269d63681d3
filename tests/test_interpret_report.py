"""The feature report: the schema the dashboard reads, its numbers against direct computation,
and the errors a user can hit. Reports are checked as the JSON the dashboard writes (to_dict)."""

import json
import math

import pytest
import torch

from saelab.errors import ConfigError, DataError
from saelab.interpret.embedding import definition_tree, feature_vectors, nearest_tokens
from saelab.interpret.sources import ContextBatch, feature_acts
from saelab.evals.metrics import DENSE_THRESHOLD
from saelab.interpret.report import _floats, _r, build_report
from saelab.interpret.schema import DETAIL_KEYS, FeatureDetail, FeatureSummary, Report
from saelab.interpret.vocab import used_token_ids
from saelab.sae import SAE

HOOK = "blocks.0.hook_resid_post"
INDEX_KEYS = {"index", "density", "max_act", "mean_act", "top_logits", "bottom_logits", "logit_skew",
              "logit_kurtosis", "kind", "enc_dec_cos", "dead"}
EXAMPLE_KEYS = {"context", "tokens", "acts", "pos", "act"}


def _report(*args, **kwargs) -> dict:
    return build_report(*args, **kwargs).to_dict()


@pytest.fixture(scope="module")
def setup(tiny_lm):
    torch.manual_seed(0)
    sae = SAE(tiny_lm.d_model, 24, arch="topk", k=3, hook_name=HOOK)
    contexts = torch.randint(0, tiny_lm.d_vocab, (24, 16), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = tiny_lm.bos_token_id
    report = _report(sae, tiny_lm, contexts, features=[0, 3, 7], n_ablate=2, ablate_max_back=5,
                          progress=False)
    return tiny_lm, sae, contexts, report


def test_schema(setup):
    lm, sae, contexts, report = setup
    assert set(report) == {"schema", "sae", "n_tokens", "dense_threshold", "density_hist", "options", "features",
                           "outliers", "single_token_share"}
    assert report["schema"] == 4 and report["n_tokens"] == contexts[:, 1:].numel()  # BOS not scanned
    # the default outlier rule, applied and recorded; the tiny LM has no massive activations
    assert report["outliers"] == {"multiple": 10.0, "skipped": 0, "positions": [], "tokens": []}
    assert report["options"]["outliers"] == {"multiple": 10.0}
    assert report["dense_threshold"] == DENSE_THRESHOLD
    assert report["options"]["features"] == [0, 3, 7] and report["options"]["ablate_max_back"] == 5
    assert report["options"]["used_ids"] == "contexts" and report["options"]["scan"]["top_k"] == 10
    assert report["sae"] == {"path": None, "arch": "topk", "d_in": lm.d_model, "d_sae": 24,
                             "hook_name": HOOK, "model_name": lm.name}
    assert sum(report["density_hist"]["counts"]) == 24
    assert len(report["density_hist"]["edges"]) == len(report["density_hist"]["counts"]) + 1
    feats = report["features"]
    assert [f["index"] for f in feats] == list(range(24))
    for f in feats:
        detail = f["index"] in (0, 3, 7)
        share = set() if f["dead"] else {"top_token_share"}  # a dead feature has no activation mass to share
        assert set(f) == INDEX_KEYS | (set(DETAIL_KEYS) if detail else set()) | share
        assert len(f["top_logits"]) == 5 and f["kind"] in ("prediction", "suppression", "partition", "other")
    f = feats[3]
    assert set(f["logits"]) == {"top", "bottom"} and len(f["logits"]["top"]) == 10
    assert set(f["embedding"]) == {"encoder", "decoder", "scale", "exponent", "overlap"}
    assert f["tree"] is None
    for ex in f["examples"] + [e for q in f["quantiles"] for e in q["examples"]]:
        assert set(ex) == EXAMPLE_KEYS | {"excluded"} and ex["excluded"] == [0] and len(ex["tokens"]) == len(ex["acts"]) == contexts.shape[1]
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN anywhere


def test_report_is_typed_and_round_trips(setup):
    """build_report gives the typed Report: a FeatureDetail for each feature given detail, and
    its JSON reads back to an equal Report."""
    lm, sae, contexts, report = setup
    typed = build_report(sae, lm, contexts, features=[0, 3, 7], n_ablate=2, ablate_max_back=5, progress=False)
    assert isinstance(typed, Report) and typed.to_dict() == report
    assert [type(f) for f in typed.features[:4]] == [FeatureDetail, FeatureSummary, FeatureSummary, FeatureDetail]
    assert Report.from_dict(json.loads(json.dumps(report))) == typed
    assert typed.stats().dense == sum(f["density"] > DENSE_THRESHOLD for f in report["features"])


def test_numbers_match_direct_computation(setup):
    lm, sae, contexts, report = setup
    with torch.no_grad():
        f = feature_acts(sae, lm, contexts)
    f[:, 0] = 0  # the BOS position is not scanned, and shows as 0 in examples
    vocab = [lm.tokenizer.decode([t]) for t in range(lm.d_vocab)]
    for j in (0, 3, 7):
        entry = report["features"][j]
        fj = f[..., j]
        assert entry["density"] == pytest.approx((fj[:, 1:] > 0).float().mean().item(), rel=1e-3)
        assert entry["max_act"] == pytest.approx(fj.max().item(), rel=1e-3)
        assert entry["dead"] == (fj.max().item() == 0)
        acts = [ex["act"] for ex in entry["examples"]]
        assert acts == sorted(acts, reverse=True) and (not acts or acts[0] == entry["max_act"])
        for ex in entry["examples"]:
            row, pos = ex["context"], ex["pos"]
            assert ex["tokens"] == [vocab[t] for t in contexts[row].tolist()]
            assert ex["acts"][0] is None and ex["excluded"] == [0]  # BOS: left out of the scan, not an activation of 0
            assert ex["acts"][1:] == pytest.approx(fj[row, 1:].tolist(), rel=1e-3, abs=1e-6)
            assert ex["act"] == pytest.approx(fj[row, pos].item(), rel=1e-3) == fj[row].max().item()
        for q in entry["quantiles"]:
            for ex in q["examples"]:
                assert q["lo"] <= ex["act"] <= q["hi"] * (1 + 1e-3)
                assert ex["act"] == pytest.approx(fj[ex["context"], ex["pos"]].item(), rel=1e-3)
        top = [a for a in entry["ablation"] if a["quantile"] is None]
        assert len(top) == min(2, len(entry["examples"])) and entry["ablation"][:len(top)] == top
        for abl in entry["ablation"]:
            ex = _ablated_example(entry, abl)
            assert abl["pos"] == ex["pos"] and abl["base_act"] == pytest.approx(ex["act"], rel=1e-3)
            assert len(abl["tokens"]) == len(abl["delta"]) == ex["pos"] + 1
            assert abl["delta"][-1] is None
            assert sum(d is not None for d in abl["delta"]) == min(5, ex["pos"])
        total = sum(t["count"] for t in entry["top_tokens"])
        assert total <= (fj > 0).sum().item()


def _ablated_example(entry: dict, abl: dict) -> dict:
    if abl["quantile"] is None:
        return entry["examples"][abl["example"]]
    return entry["quantiles"][abl["quantile"]]["examples"][abl["example"]]


def _bins_nearest_middle(entry: dict) -> list[int]:
    """Non-empty quantile bins in the order the report picks them (5 bins: 2, 3, 1, 4, 0)."""
    return [b for b in (2, 3, 1, 4, 0) if entry["quantiles"][b]["examples"]]


def test_quantile_example_ablation(setup):
    """One quantile example per feature by default: the middle example of the non-empty bin
    nearest the middle bin."""
    _, _, _, report = setup
    for j in (0, 3, 7):
        entry = report["features"][j]
        rows = [a for a in entry["ablation"] if a["quantile"] is not None]
        want = [(b, len(entry["quantiles"][b]["examples"]) // 2) for b in _bins_nearest_middle(entry)[:1]]
        assert [(a["quantile"], a["example"]) for a in rows] == want and want
        for abl in rows:
            ex = _ablated_example(entry, abl)
            assert abl["tokens"] == ex["tokens"][:ex["pos"] + 1]
            assert abl["delta"][-1] is None and sum(d is not None for d in abl["delta"]) == min(5, ex["pos"])


def test_quantile_ablation_count_and_one_batched_call(setup, monkeypatch):
    lm, sae, contexts, report = setup
    from saelab.interpret import report as report_module

    calls, real = [], report_module.ablate_tokens
    monkeypatch.setattr(report_module, "ablate_tokens", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    rep = _report(sae, lm, contexts, features=[0, 3, 7], n_ablate=1, n_ablate_quantile=3,
                       ablate_max_back=5, progress=False)
    n_rows = 0
    for j in (0, 3, 7):
        entry = rep["features"][j]
        assert [a["quantile"] for a in entry["ablation"][1:]] == _bins_nearest_middle(entry)[:3]
        assert entry["ablation"][0] == report["features"][j]["ablation"][0]  # the same top-1 row
        n_rows += len(entry["ablation"])
    assert calls == [n_rows]  # top and quantile requests together, in one call
    none = _report(sae, lm, contexts, features=[3], n_ablate=0, n_ablate_quantile=0, progress=False)
    assert none["features"][3]["ablation"] == []


def test_embedding_overlap_against_direct_token_lists(setup):
    lm, sae, contexts, report = setup
    n = lm.W_E.shape[0]
    mask = used_token_ids(contexts, n) & (torch.arange(n) < len(lm.tokenizer))
    ids = {w: nearest_tokens(lm, feature_vectors(lm, sae, [0, 3, 7], w, 1.0, mask), k=10, mask=mask)[0]
           for w in ("encoder", "decoder")}
    for row, j in enumerate((0, 3, 7)):
        enc, dec = set(ids["encoder"][row].tolist()), set(ids["decoder"][row].tolist())
        got = report["features"][j]["embedding"]["overlap"]
        assert got == {"k": 10, "shared": len(enc & dec), "jaccard": _r(len(enc & dec) / len(enc | dec))}


def test_tied_sae_has_identical_encoder_and_decoder_views(setup):
    """W_dec = W_enc.T: the two token lists and the two trees must agree completely."""
    lm, _, contexts, _ = setup
    torch.manual_seed(1)
    tied = SAE(lm.d_model, 6, arch="relu", hook_name=HOOK)
    with torch.no_grad():
        tied.W_dec.copy_(tied.W_enc.T * 3.0)  # any positive scale: the views normalise it away
    rep = _report(tied, lm, contexts, features=[1, 4], tree=True, tree_vector="both", tree_filter=False,
                       tree_depth=2, tree_breadth=3, n_ablate=0, progress=False)
    for j in (1, 4):
        emb, tree = rep["features"][j]["embedding"], rep["features"][j]["tree"]
        assert emb["overlap"] == {"k": 10, "shared": 10, "jaccard": 1.0}
        assert tree["vector"] == "both" and set(tree["roots"]) == {"encoder", "decoder"}
        assert tree["overlap"] == {"k": 3, "shared": 3, "jaccard": 1.0}


def test_tree_from_both_vectors(setup):
    lm, sae, contexts, _ = setup
    kw = dict(features=[5], tree=True, tree_depth=2, tree_breadth=2, n_ablate=0, n_ablate_quantile=0,
              tree_filter=False, progress=False)
    both = _report(sae, lm, contexts, tree_vector="both", **kw)["features"][5]["tree"]
    for which in ("encoder", "decoder"):
        one = _report(sae, lm, contexts, tree_vector=which, **kw)["features"][5]["tree"]
        assert list(one["roots"]) == [which] and one["overlap"] is None
        assert both["roots"][which] == one["roots"][which]
        direct = definition_tree(lm, feature_vectors(lm, sae, [5], which, 1.0)[0], depth=2, breadth=2)
        assert [c["text"] for c in one["roots"][which]["children"]] == [c["text"] for c in direct["children"]]
    enc, dec = ({c["text"] for c in both["roots"][w]["children"]} for w in ("encoder", "decoder"))
    assert both["overlap"] == {"k": 2, "shared": len(enc & dec), "jaccard": _r(len(enc & dec) / len(enc | dec))}
    with pytest.raises(ConfigError, match="tree_vector must be one of encoder, decoder, both; got 'middle'"):
        _report(sae, lm, contexts, tree_vector="middle", **kw)


def test_dead_features_are_counted_in_the_first_density_bin(setup):
    """What the index's histogram caption says: dead features sit in the leftmost bin."""
    lm, _, contexts, _ = setup
    sae = SAE(lm.d_model, 8, arch="relu", hook_name=HOOK)
    with torch.no_grad():
        sae.W_enc[:, :3] = 0.0
        sae.b_enc[:3] = -1.0  # features 0-2 can never fire
    rep = _report(sae, lm, contexts, features=[], progress=False)
    dead = [f["index"] for f in rep["features"] if f["dead"]]
    counts, edges = rep["density_hist"]["counts"], rep["density_hist"]["edges"]
    assert dead[:3] == [0, 1, 2] and sum(counts) == 8
    live_first = sum(not f["dead"] and math.log10(f["density"]) < edges[1] for f in rep["features"])
    assert counts[0] == len(dead) + live_first


def test_precomputed_activations_give_the_same_report(setup):
    lm, sae, contexts, report = setup
    acts = lm.run_with_cache(contexts, [HOOK])[HOOK]
    batches = [ContextBatch(contexts[i:i + 5], torch.arange(i, min(i + 5, 24)), acts[i:i + 5])
               for i in range(0, 24, 5)]
    again = _report(sae, lm, contexts, acts=batches, features=[0, 3, 7], n_ablate=2,
                         ablate_max_back=5, progress=False)
    assert again == report


def test_bos_position_scanned_only_when_asked_or_absent(setup):
    lm, sae, contexts, report = setup
    with_bos = _report(sae, lm, contexts, features=[], exclude_bos=False, progress=False)
    assert with_bos["n_tokens"] == contexts.numel()
    with torch.no_grad():
        f = feature_acts(sae, lm, contexts)
    assert [e["density"] for e in with_bos["features"]] == [_r((f[..., j] > 0).float().mean()) for j in range(24)]
    no_bos = contexts.clone()
    no_bos[:, 0] = (lm.bos_token_id + 1) % lm.d_vocab  # contexts not starting with BOS: nothing to skip
    assert _report(sae, lm, no_bos, features=[], progress=False)["n_tokens"] == contexts.numel()


def test_tree_and_window(setup):
    lm, sae, contexts, _ = setup
    rep = _report(sae, lm, contexts, features=[5], tree=True, tree_depth=2, tree_breadth=2, tree_filter=False,
                       window=(3, 1), n_ablate=0, n_ablate_quantile=0, progress=False)
    f = rep["features"][5]
    assert f["tree"]["vector"] == "encoder" and len(f["tree"]["roots"]["encoder"]["children"]) == 2
    assert f["ablation"] == []
    for ex in f["examples"]:
        assert ex["tokens"][ex["pos"]] == lm.tokenizer.decode([contexts[ex["context"], ex["start"] + ex["pos"]]])
        assert len(ex["tokens"]) <= 5 and ex["pos"] == min(3, ex["start"] + ex["pos"])


def test_errors(setup, tmp_path):
    lm, sae, contexts, _ = setup
    with pytest.raises(ConfigError, match=r"out of range.*0\.\.23"):
        _report(sae, lm, contexts, features=[24])
    with pytest.raises(ConfigError, match="not trained on this model"):
        _report(SAE(lm.d_model + 2, 4, hook_name=HOOK), lm, contexts)
    with pytest.raises(ConfigError, match="unknown hook name"):
        _report(SAE(lm.d_model, 4, hook_name="blocks.9.hook_resid_post"), lm, contexts)
    with pytest.raises(ConfigError, match="no hook_name"):
        _report(SAE(lm.d_model, 4), lm, contexts)
    with pytest.raises(ConfigError, match="unknown report option"):
        _report(sae, lm, contexts, top_k=3)
    with pytest.raises(DataError, match="contexts"):
        _report(sae, lm, torch.zeros(5), features=[])
    with pytest.raises(ConfigError, match="used_ids must be a bool mask, 'contexts' or None, got 'all'"):
        _report(sae, lm, contexts, used_ids="all")
    folder = tmp_path / "sae"
    sae.save(folder)
    rep = _report(folder, lm, contexts[:4], features=[], progress=False)
    assert rep["sae"]["path"] == str(folder)


def test_rounding_to_four_significant_digits():
    vals = [0.0, 1.0, 0.34494999, 123456.7, -9.87654e-7, 5e20, float("nan"), float("inf")]
    vals += (torch.randn(2000, dtype=torch.float64) * 10.0 ** torch.randint(-8, 9, (2000,))).tolist()
    want = [None if not torch.isfinite(torch.tensor(v)) else float(f"{v:.4g}") for v in vals]
    assert _floats(vals) == want
    assert [_r(v) for v in vals] == want
