"""Attribution graphs (experiments/graph*.py, lm/frozen.py): the frozen replacement model
reproduces the model, every edge equals the effect of ablating its source in the frozen model,
incoming edges plus the bias add up to the target, and the command's bad inputs are one-line errors."""

import json

import pytest
import torch

from saelab.errors import ConfigError
from saelab.experiments.graph_attribution import Scales, attribute, mlp_hooks, replay
from saelab.lm.frozen import frozen
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE

TOKENS = torch.tensor([[0, 5, 9, 13, 7, 22]])


def transcoders_for(lm: HookedLM, d_sae: int = 24, seed: int = 0, arch: str = "relu") -> dict:
    """Random relu transcoders at every layer, biased so about half their features fire."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(lm.n_layers):
        hin, hout = mlp_hooks(layer)
        tc = SAE(lm.d_model, d_sae, arch=arch, d_out=lm.d_model, hook_name=hin, hook_name_out=hout).double()
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(lm.d_model, d_sae, generator=gen, dtype=torch.float64) * 0.3)
            tc.W_dec.copy_(torch.randn(d_sae, lm.d_model, generator=gen, dtype=torch.float64) * 0.3)
            tc.b_enc.copy_(torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.5)
            tc.b_dec.copy_(torch.randn(lm.d_model, generator=gen, dtype=torch.float64) * 0.1)
        out[layer] = tc
    return out


@pytest.fixture(scope="module", params=["gpt_neox", "gpt_neox_sequential", "gpt2", "llama"])
def setup(request, tiny_hf_model_dirs):
    lm = HookedLM.load(tiny_hf_model_dirs[request.param], dtype=torch.float64)
    tcs = transcoders_for(lm)
    return lm, tcs, attribute(lm, tcs, TOKENS, progress=False)


def values_with(lm, tcs, clean, edit) -> torch.Tensor:
    """Every target's value (features' pre-activations, then all logits at the last position) in
    the frozen model with the node scales `edit` changed from ones."""
    with frozen(lm) as state:
        lm.forward(inputs_embeds=clean.embed.unsqueeze(0))  # record on the clean input
        state.replay()
        scales = Scales.ones(clean)
        edit(scales)
        with torch.no_grad():
            pre, logits = replay(lm, tcs, clean, scales)
    return torch.cat([p.reshape(-1) for p in pre] + [logits[-1]])


def target_values(nodes, values, tcs, lm) -> torch.Tensor:
    """Pick each node's value out of `values_with`'s vector (non-targets: 0)."""
    d_sae = tcs[0].cfg.d_sae
    seq = TOKENS.shape[1]
    out = torch.zeros(len(nodes), dtype=torch.float64)
    for i, n in enumerate(nodes):
        if n.kind == "feature":
            out[i] = values[n.layer * seq * d_sae + n.pos * d_sae + n.feature]
        elif n.kind == "logit":
            out[i] = values[lm.n_layers * seq * d_sae + n.feature]
    return out


def test_replacement_reproduces_the_model(setup):
    """Transcoders + error nodes in the frozen model give the model's own MLP inputs and logits:
    without the error nodes they would not."""
    lm, tcs, att = setup
    logits, cache = lm.run_with_cache(TOKENS, [mlp_hooks(L)[0] for L in range(lm.n_layers)], return_logits=True)
    assert torch.allclose(att.clean.logits, logits[0], atol=1e-9)
    values = values_with(lm, tcs, att.clean, lambda s: None)
    d = tcs[0].cfg.d_sae * TOKENS.shape[1]
    for L in range(lm.n_layers):
        assert torch.allclose(values[L * d:(L + 1) * d], tcs[L].pre_acts(cache[mlp_hooks(L)[0]][0]).reshape(-1), atol=1e-9)
    assert torch.allclose(values[lm.n_layers * d:], logits[0, -1], atol=1e-9)
    without = values_with(lm, tcs, att.clean, lambda s: s.errors.zero_())
    assert (without[lm.n_layers * d:] - logits[0, -1]).abs().max() > 1e-3  # the error nodes matter


def test_edges_equal_ablations_and_add_up(setup):
    """edge(s -> t) = value_t(clean) - value_t(s ablated) in the frozen model, for every source and
    target; and value_t = bias_t + sum of its incoming edges, bias_t = value_t with every node at 0."""
    lm, tcs, att = setup
    nodes, A = att.nodes, att.adjacency
    assert sum(n.kind == "feature" for n in nodes) > 10 and nodes[-1].kind == "logit"
    clean = target_values(nodes, values_with(lm, tcs, att.clean, lambda s: None), tcs, lm)
    is_target = torch.tensor([n.kind in ("feature", "logit") for n in nodes])

    def ablate(node):
        def edit(s):
            if node.kind == "embedding":
                s.embed[node.pos] = 0
            elif node.kind == "error":
                s.errors[node.layer, node.pos] = 0
            else:
                s.feats[node.layer][node.pos, node.feature] = 0
        return edit

    for j, src in enumerate(nodes[:-1]):
        ablated = target_values(nodes, values_with(lm, tcs, att.clean, ablate(src)), tcs, lm)
        assert torch.allclose(A[is_target, j], (clean - ablated)[is_target], atol=1e-9, rtol=1e-7), src
    zero = target_values(nodes, values_with(lm, tcs, att.clean, lambda s: (s.embed.zero_(), s.errors.zero_(),
                                                                        [f.zero_() for f in s.feats])), tcs, lm)
    for i, n in enumerate(nodes):
        if n.kind in ("feature", "logit"):
            assert n.bias == pytest.approx(float(zero[i]), abs=1e-9)
            assert float(A[i].sum()) + n.bias == pytest.approx(float(clean[i]), abs=1e-9)
    assert (A[~is_target] == 0).all()  # nothing flows into embeddings or errors
    for i, n in enumerate(nodes):  # causal and layered: no edge from a later position or layer
        for j, s in enumerate(nodes):
            if A[i, j] != 0:
                assert s.pos <= n.pos and (s.layer is None or n.layer is None or s.layer < n.layer)


def test_bad_transcoders(tiny_hf_model_dirs):
    lm = HookedLM.load(tiny_hf_model_dirs["gpt_neox"], dtype=torch.float64)
    tcs = transcoders_for(lm)
    with pytest.raises(ConfigError, match="transcoder at every layer.*layer\\(s\\) 1"):
        attribute(lm, {0: tcs[0]}, TOKENS, progress=False)
    wrong = SAE(lm.d_model, 8, arch="relu", hook_name="blocks.1.hook_resid_post").double()
    with pytest.raises(ConfigError, match="reads blocks.1.hook_resid_post"):
        attribute(lm, {0: tcs[0], 1: wrong}, TOKENS, progress=False)
    gated = transcoders_for(lm, arch="gated")
    with pytest.raises(ConfigError, match="pre-activation"):
        attribute(lm, gated, TOKENS, progress=False)


def _save_transcoders(lm, folder, layers=None):
    for layer, tc in transcoders_for(lm).items():
        if layers is None or layer in layers:
            tc.float().save(folder / f"layer{layer}" / "saes" / "relu")
    return folder


def test_command_writes_graph_and_page(tmp_path, tiny_hf_model_dirs, capsys):
    from saelab.cli import main

    model = str(tiny_hf_model_dirs["gpt_neox"])
    lm = HookedLM.load(model)
    tcs = _save_transcoders(lm, tmp_path / "tc")
    argv = ["graph", "w5 w9 w13 w7 w22", "--transcoders", str(tcs), "--model", model, "--out", str(tmp_path / "g")]
    assert main(argv + ["--max-nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "of the influence on the logit" in out and "warning: the pruned graph keeps only" in out
    assert main(argv + ["--logit", "w7"]) == 0
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert data["logit_token"] == "w7" and data["kept_fraction"] >= 0.8 and data["warning"] is None
    keys = {n["key"] for n in data["nodes"]}
    assert all(e["source"] in keys and e["target"] in keys for e in data["edges"])
    html = (tmp_path / "g" / "graph.html").read_text()
    assert html.count('class="node ') == len(data["nodes"]) and "<svg" in html
    feat = next(n for n in data["nodes"] if n["kind"] == "feature")  # a dashboard of its layer: the node links to it
    dash = tmp_path / "dash"
    (dash / "features").mkdir(parents=True)
    (dash / "report.json").write_text(json.dumps({"sae": {"hook_name": mlp_hooks(feat["layer"])[0]}}))
    (dash / "features" / f"{feat['feature']}.html").write_text("page")
    assert main(argv + ["--logit", "w7", "--dashboards", str(dash)]) == 0
    link = f'href="../dash/features/{feat["feature"]}.html"'
    assert link in (tmp_path / "g" / "graph.html").read_text()
    for bad, msg in ((["graph", "  "], "prompt is empty"), (["graph", "w5 " * 20], "longer than the model's context"),
                     (["graph", "w5", "--logit", "w5 w6"], "give one token")):
        assert main(bad + argv[2:]) == 2
        assert msg in capsys.readouterr().err
    _save_transcoders(lm, tmp_path / "half", layers=[0])
    assert main(["graph", "w5", "--transcoders", str(tmp_path / "half"), "--model", model]) == 2
    assert "none for layer(s) 1" in capsys.readouterr().err


def test_frozen_records_replays_and_restores(tiny_hf_model_dirs):
    """The recording pass is the model's forward; a replay keeps patterns and scales (so the
    attention output and the MLP input are linear in the embeddings); leaving restores the
    model; misuse is an error."""
    lm = HookedLM.load(tiny_hf_model_dirs["llama"], dtype=torch.float64)
    before = lm.forward(TOKENS)
    impl = lm.model.config._attn_implementation
    e = lm.embed(TOKENS)
    with frozen(lm) as state:
        with pytest.raises(ConfigError, match="nothing recorded"):
            state.replay()
        assert torch.allclose(lm.forward(inputs_embeds=e), before, atol=1e-6)
        state.replay()
        for name in ("blocks.0.hook_attn_out", "blocks.0.ln2.hook_normalized"):  # before any MLP; no biases
            f1, f3 = (lm.run_with_cache(inputs_embeds=c * e, names=[name])[name] for c in (1.0, 3.0))
            assert torch.allclose(f3, 3 * f1, atol=1e-9)
        with pytest.raises(ConfigError, match="does not match the recorded"):
            lm.forward(TOKENS[:, :3])
    assert lm.model.config._attn_implementation == impl
    assert torch.equal(lm.forward(TOKENS), before)
    name = "blocks.0.hook_attn_out"  # unfrozen, the norm before attention undoes the scaling
    f1, f3 = (lm.run_with_cache(inputs_embeds=c * e, names=[name])[name] for c in (1.0, 3.0))
    assert torch.allclose(f3, f1, rtol=0.02, atol=1e-4) and not torch.allclose(f3, 3 * f1, rtol=0.5)


def test_influence_sums_paths_and_prune_keeps_the_heavy_ones():
    """emb0 -> f -> logit and emb0 -> logit, emb1 -> logit: influence is the sum over paths of the
    products of each edge's share of its target's incoming |edges|."""
    from saelab.experiments.graph_prune import influence, prune

    kinds = ["embedding", "embedding", "feature", "logit"]
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[2, 0] = 2.0  # emb0 -> f
    A[3, 2], A[3, 0], A[3, 1] = 3.0, -1.0, 0.5  # f, emb0, emb1 -> logit (shares 3/4.5, 1/4.5, 0.5/4.5)
    infl = influence(A, 3, depth=4)
    assert infl.tolist() == pytest.approx([1 / 4.5 + 3 / 4.5 * 1.0, 0.5 / 4.5, 3 / 4.5, 0.0])
    kept = prune(A, kinds, node_threshold=0.9)
    assert kept.nodes == [0, 2, 3]
    total = float(infl.sum())
    assert kept.kept_fraction == pytest.approx((float(infl[0]) + float(infl[2])) / total)
    assert (0, 2) in kept.edges and (2, 3) in kept.edges and all(1 not in e for e in kept.edges)
    assert prune(A, kinds, node_threshold=0.9, max_nodes=1).nodes == [0, 3]
