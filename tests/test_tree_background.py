"""Definition trees without their generic parts (seed 003): outputs of a tree, the filter on a
hand-made tree and background, the background's counts against trees grown one at a time, its
cache, and `saelab tokens --tree` filtered by default and whole with --unfiltered."""

import argparse
import json

import pytest
import torch

from saelab.commands import tokens
from saelab.errors import ConfigError
from saelab.interpret import tree_background as tb
from saelab.interpret.embedding import definition_tree, definition_trees, feature_vectors
from saelab.sae import SAE


def _node(text, *children, prob=0.5):
    return {"text": text, "prob": prob, "children": list(children)}


TREE = _node("PROMPT", _node(" a", _node(" group", _node(" of")), _node(" cat", _node("s"))), _node(" the"),
             _node(" feline", _node(" animal")))


def test_outputs_are_paths_from_the_root():
    assert tb.outputs(TREE) == {" a", " a group", " a group of", " a cat", " a cats", " the", " feline",
                                " feline animal"}


def test_filter_drops_generic_keeps_specific_and_its_context():
    background = tb.Background("m", {}, 10, {" a": 10, " a group": 9, " a group of": 8, " the": 7, " a cat": 1,
                                             " feline animal": 3})
    got = tb.filter_tree(TREE, background, min_share=0.3)
    assert got["text"] == "PROMPT" and tb.outputs(got) == {" a", " a cat", " a cats", " feline"}
    a = got["children"][0]
    assert a["generic"] is True and a["background"] == 1.0  # kept: " a cat" grows from it
    assert [c["text"] for c in a["children"]] == [" cat"] and a["children"][0]["generic"] is False
    feline = got["children"][1]
    assert feline["generic"] is False and feline["children"] == []  # " feline animal": at the threshold, a leaf
    assert tb.outputs(tb.filter_tree(TREE, background, min_share=0.31)) >= {" feline animal"}
    assert tb.filter_tree(TREE, background, min_share=1.0)["children"][0]["children"][0]["text"] == " group"
    with pytest.raises(ConfigError, match="min_share"):
        tb.filter_tree(TREE, background, min_share=0)


def test_background_counts_trees_grown_one_at_a_time(tiny_lm):
    cfg = tb.BackgroundConfig(n_samples=6, depth=2, breadth=2, chunk=4, seed=3)
    points = tb.random_points(tiny_lm, 6, 1.0, seed=3)
    radius = tiny_lm.W_E.detach().float().norm(dim=1).mean()
    assert torch.allclose(points.norm(dim=1), radius.expand(6), rtol=1e-5)
    want = {}
    for p in points:
        for text in tb.outputs(definition_tree(tiny_lm, p, depth=2, breadth=2)):
            want[text] = want.get(text, 0) + 1
    assert tb.count_outputs(tiny_lm, cfg, progress=False) == want
    batched = definition_trees(tiny_lm, points[:3], depth=2, breadth=2, max_batch=5)
    single = [definition_tree(tiny_lm, p, depth=2, breadth=2) for p in points[:3]]
    assert [tb.outputs(t) for t in batched] == [tb.outputs(t) for t in single]


def test_background_is_cached_per_model_and_settings(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    cfg = tb.BackgroundConfig(n_samples=8, depth=2, breadth=2)
    built = tb.tree_background(tiny_lm, cfg, progress=False)
    path = tb.background_file(tiny_lm, cfg)
    assert path.parent == tmp_path / "tree-backgrounds" and json.loads(path.read_text())["n_trees"] == 8
    assert sum(built.counts.values()) >= 8 and built.ranking(1)[0][1] == max(built.counts.values()) / 8

    def fail(*a, **k):
        raise AssertionError("rebuilt a cached background")
    monkeypatch.setattr(tb, "count_outputs", fail)
    assert tb.tree_background(tiny_lm, cfg).counts == built.counts
    assert tb.background_file(tiny_lm, tb.BackgroundConfig(n_samples=8, depth=3, breadth=2)) != path
    with pytest.raises(AssertionError, match="rebuilt"):
        tb.tree_background(tiny_lm, tb.BackgroundConfig(n_samples=9, depth=2, breadth=2))


def _run(argv):
    parser = argparse.ArgumentParser()
    tokens.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokens_tree_filtered_by_default(tiny_lm, tiny_lm_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    torch.manual_seed(0)
    sae = SAE(tiny_lm.d_model, 8, hook_name="blocks.1.hook_resid_post", model_name=str(tiny_lm_path))
    sae.save(tmp_path / "sae")
    base = ["tokens", str(tmp_path / "sae"), "--feature", "2", "--vector", "encoder", "--tree", "--depth", "2",
            "--breadth", "3", "--json", "--background-samples", "48"]
    assert _run(base + ["--unfiltered"]) == 0
    whole = json.loads(capsys.readouterr().out)[0]["tree"]
    vec = feature_vectors(tiny_lm, sae, [2], "encoder", 1.0)[0]
    assert tb.outputs(whole) == tb.outputs(definition_tree(tiny_lm, vec, depth=2, breadth=3))
    assert _run(base + ["--generic-share", "0.2"]) == 0
    filtered = json.loads(capsys.readouterr().out)[0]["tree"]
    background = tb.tree_background(tiny_lm, tb.BackgroundConfig(n_samples=48, depth=2, breadth=3))
    assert filtered == tb.filter_tree(whole, background, 0.2)
    kept = tb.outputs(filtered)
    for text in tb.outputs(whole):
        if background.share(text) < 0.2:
            assert text in kept  # specific outputs stay
        elif not any(k.startswith(text) and background.share(k) < 0.2 for k in kept if k != text):
            assert text not in kept  # generic ones go, unless a specific one grows from them
    assert kept != tb.outputs(whole)  # this tiny model's trees do share outputs
    assert _run([a for a in base if a != "--json"]) == 0  # the text form says what was left out
    assert "without continuations in >= 0.1 of 48" in capsys.readouterr().out


def test_dashboard_trees_are_filtered_by_default(tiny_lm, tmp_path, monkeypatch):
    from saelab.interpret.dashboard import write_dashboard
    from saelab.interpret.report import build_report

    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    torch.manual_seed(0)
    sae = SAE(tiny_lm.d_model, 8, hook_name="blocks.1.hook_resid_post")
    contexts = torch.randint(0, tiny_lm.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(features=[3], tree=True, tree_depth=2, tree_breadth=3, n_ablate=0, n_ablate_quantile=0,
              tree_background_samples=40, tree_generic_share=0.3, progress=False)
    whole = build_report(sae, tiny_lm, contexts, tree_filter=False, **kw).to_dict()["features"][3]["tree"]
    report = build_report(sae, tiny_lm, contexts, **kw)
    tree = report.to_dict()["features"][3]["tree"]
    background = tb.tree_background(tiny_lm, tb.BackgroundConfig(n_samples=40, depth=2, breadth=3))
    want = tb.filter_tree(whole["roots"]["encoder"], background, 0.3)
    assert tb.outputs(tree["roots"]["encoder"]) == tb.outputs(want) != tb.outputs(whole["roots"]["encoder"])
    assert tree["generic_share"] == 0.3 and tree["background_trees"] == 40 and "generic_share" not in whole
    write_dashboard(report, tmp_path / "dash", progress=False)
    page = (tmp_path / "dash" / "features" / "3.html").read_text()
    assert "trees of 40 random points in embedding space" in page
