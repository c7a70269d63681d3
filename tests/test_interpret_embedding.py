"""Embedding-space views: encoder/decoder cosine, token lists and definition trees against
direct, one-at-a-time computations."""

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.interpret.embedding import (definition_tree, enc_dec_cosine, feature_vectors,
                                        ghost_prompt, nearest_tokens, overlap)
from saelab.sae import SAE


def _sae(d, n=6, seed=0):
    torch.manual_seed(seed)
    sae = SAE(d, n, hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():
        sae.W_enc.normal_()
    return sae


def test_enc_dec_cosine():
    sae = _sae(5).requires_grad_(False)
    want = [float(sae.W_enc[:, j] @ sae.W_dec[j] / (sae.W_enc[:, j].norm() * sae.W_dec[j].norm()))
            for j in range(6)]
    assert enc_dec_cosine(sae).tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ConfigError, match="transcoder"):
        enc_dec_cosine(SAE(5, 6, d_out=7))


def test_overlap_known_answers():
    assert overlap([1, 2, 3, 4], [3, 4, 5]) == {"shared": 2, "jaccard": 2 / 5}
    assert overlap([1, 1, 2], [2, 1]) == {"shared": 2, "jaccard": 1.0}  # lists taken as sets
    assert overlap(["a"], ["b"]) == {"shared": 0, "jaccard": 0.0}
    assert overlap([], []) == {"shared": 0, "jaccard": 1.0}


def test_feature_vectors_and_nearest_tokens(tiny_lm):
    lm = tiny_lm
    sae = _sae(lm.d_model)
    mask = torch.ones(lm.W_E.shape[0], dtype=torch.bool)
    mask[::3] = False
    v = feature_vectors(lm, sae, [1, 4], "decoder", scale=2.0, mask=mask)
    radius = lm.W_E[mask].norm(dim=1).mean().item()
    assert v.norm(dim=1).tolist() == pytest.approx([2 * radius] * 2, rel=1e-5)
    torch.testing.assert_close(v[1] / v[1].norm(), sae.W_dec[4].detach() / sae.W_dec[4].norm())
    ids, scores = nearest_tokens(lm, v, k=5, exponent=3.0, mask=mask)
    for row in range(2):
        brute = []
        for t in range(lm.W_E.shape[0]):
            if mask[t]:
                e = lm.W_E[t].double()
                vv = v[row].double()
                c = float(vv @ e / (vv.norm() * e.norm()))
                brute.append((math.copysign(abs(c) ** 3, c) / float((vv - e).norm()), t))
        brute.sort(reverse=True)
        assert ids[row].tolist() == [t for _, t in brute[:5]]
        assert scores[row].tolist() == pytest.approx([s for s, _ in brute[:5]], rel=1e-4)
    one_ids, _ = nearest_tokens(lm, v[0], k=5, exponent=3.0, mask=mask)
    assert torch.equal(one_ids, ids[0])
    with pytest.raises(ConfigError, match="out of range"):
        feature_vectors(lm, sae, [6])
    with pytest.raises(ConfigError, match="'encoder' or 'decoder'"):
        feature_vectors(lm, sae, [0], "middle")
    with pytest.raises(ConfigError, match="d_model-wide"):
        feature_vectors(lm, _sae(lm.d_model + 1), [0])


def test_ghost_prompt_tokens(tiny_lm):
    ids, ghost = ghost_prompt(tiny_lm)
    tok = tiny_lm.tokenizer
    before = tok.encode("A typical definition of", add_special_tokens=False)
    after = tok.encode(' is "', add_special_tokens=False)
    assert ids.tolist() == [tiny_lm.bos_token_id] + before + [0] + after
    assert ghost == 1 + len(before)
    with pytest.raises(ConfigError, match="exactly once"):
        ghost_prompt(tiny_lm, "no ghost here")


def _probs(lm, vector, path):
    """Next-token distribution after the ghost prompt + path, one unbatched forward."""
    ids, ghost = ghost_prompt(lm)
    emb = lm.embed(torch.cat([ids, torch.tensor(path, dtype=torch.long)]))
    emb[0, ghost] = vector
    return lm.forward(inputs_embeds=emb)[0, -1].softmax(-1)


def test_definition_tree_matches_unbatched_expansion(tiny_lm):
    lm = tiny_lm
    vec = feature_vectors(lm, _sae(lm.d_model), [2], "encoder", scale=1.5)[0]
    tree = definition_tree(lm, vec, depth=2, breadth=3, max_batch=2)
    assert tree["prob"] == 1.0 and len(tree["children"]) == 3

    def check(node, path, level):
        if not node["children"]:
            assert level == 2 or '"' in node["text"]
            return
        p = _probs(lm, vec, path)
        top = p.topk(3)
        assert [c["text"] for c in node["children"]] == [lm.tokenizer.decode([t]) for t in top.indices.tolist()]
        for child, t, q in zip(node["children"], top.indices.tolist(), top.values.tolist()):
            assert child["prob"] == pytest.approx(node["prob"] * q, rel=1e-4)
            check(child, path + [t], level + 1)

    check(tree, [], 0)
    first = tree["children"][0]["text"]
    stopped = definition_tree(lm, vec, depth=2, breadth=3, stop=first)
    assert stopped["children"][0]["children"] == [] and stopped["children"][1]["children"]
    pruned = definition_tree(lm, vec, depth=3, breadth=2, min_prob=1.1)
    assert all(c["children"] == [] for c in pruned["children"])
    with pytest.raises(ConfigError, match="context length"):
        definition_tree(lm, vec, depth=lm.context_length)
