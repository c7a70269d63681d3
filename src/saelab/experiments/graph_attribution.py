"""The exact attribution graph of one prompt through a replacement model of transcoders.

The replacement model: each layer L's MLP is replaced by its transcoder (reading
`blocks.L.ln2.hook_normalized`, writing `blocks.L.hook_mlp_out`) plus an error node per
position, err = MLP out - transcoder out on the clean pass, so the replacement reproduces the
model's activations exactly. With attention patterns and norm scales frozen (`saelab.lm.frozen`)
and each feature's activation held at its clean value, every feature pre-activation and the
chosen logit are affine in the nodes' contributions:

    value_t = bias_t + sum_s edge(s -> t),   edge(s -> t) = a_s * d value_t / d a_s

where a_s multiplies the source's fixed vector (a feature: activation times its decoder row; an
error: its error vector, a_s = 1; a token embedding: its embedding row, a_s = 1) and the
derivative runs through the frozen, linear paths only (other features are held, so edges are
direct effects). Being a derivative of an affine map, an edge equals the change in the target
when its source is ablated in the frozen model (tests/test_graph.py checks that, and the sum).

Nodes: token embeddings (per position), active transcoder features (layer, position, index),
error nodes (layer, position) and the logit. `attribute` returns them with the dense adjacency
matrix A (target row, source column); `saelab.experiments.graph_prune` ranks and prunes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.experiments.sparse_mlp import mlp_hooks  # the hooks a transcoder of layer L reads and writes
from saelab.lm.frozen import frozen
from saelab.lm.hooked import HookedLM


@dataclass
class Node:
    """One node of the graph. `value` is what it contributes with: a feature's activation, the
    norm of an error or embedding vector, the logit itself; `bias` (features and the logit) is
    value (pre-activation) minus the sum of all its incoming edges: what no node explains."""

    kind: str  # "embedding", "feature", "error" or "logit"
    layer: int | None  # None for embeddings and the logit
    pos: int
    feature: int | None  # feature index (features); the logit: its token id
    token: str  # the prompt's token at pos, as text (the logit: the predicted token)
    value: float
    bias: float | None = None
    influence: float = 0.0  # share of the logit's indirect influence through it (graph_prune)

    def key(self) -> str:
        if self.kind == "feature":
            return f"L{self.layer}/{self.pos}/{self.feature}"
        return {"embedding": f"E/{self.pos}", "error": f"err{self.layer}/{self.pos}"}.get(self.kind, f"logit/{self.pos}")


class Clean(NamedTuple):
    """The clean pass: embeddings (seq, d), per layer feature activations (seq, d_sae) and
    errors (seq, d), and the logits (seq, vocab)."""

    embed: Tensor
    acts: list[Tensor]
    errors: list[Tensor]
    logits: Tensor


class Scales(NamedTuple):
    """Multipliers on every node's contribution (leaves for autograd; all ones is the clean pass)."""

    embed: Tensor  # (seq,)
    errors: Tensor  # (n_layers, seq)
    feats: list[Tensor]  # per layer (seq, d_sae)

    @classmethod
    def ones(cls, clean: Clean, grad: bool = False) -> "Scales":
        seq, dtype = clean.embed.shape[0], clean.embed.dtype
        return cls(torch.ones(seq, dtype=dtype, requires_grad=grad),
                   torch.ones(len(clean.errors), seq, dtype=dtype, requires_grad=grad),
                   [torch.ones_like(a).requires_grad_(grad) for a in clean.acts])

    def leaves(self) -> list[Tensor]:
        return [self.embed, self.errors, *self.feats]


def check_transcoders(lm: HookedLM, transcoders: dict) -> None:
    """Every layer has one transcoder reading its MLP input and writing its MLP output."""
    missing = [layer for layer in range(lm.n_layers) if layer not in transcoders]
    if missing:
        raise ConfigError(f"a graph needs a transcoder at every layer of {lm.name or 'the model'} (0..{lm.n_layers - 1}); "
                          f"none for layer(s) {', '.join(map(str, missing))}: train them with `saelab sparse-mlp`")
    for layer, tc in transcoders.items():
        want = mlp_hooks(layer)
        have = (tc.cfg.hook_name, tc.cfg.hook_name_out)
        if have != want:
            raise ConfigError(f"the SAE given for layer {layer} reads {have[0]} and writes {have[1]}; a graph needs a "
                              f"transcoder reading {want[0]} and writing {want[1]}")
        if tc.cfg.d_in != lm.d_model or tc.cfg.d_out != lm.d_model:
            raise ConfigError(f"the transcoder of layer {layer} maps {tc.cfg.d_in} -> {tc.cfg.d_out} but the model's "
                              f"width is {lm.d_model}: it was not trained on this model")


def clean_pass(lm: HookedLM, transcoders: dict, tokens: Tensor) -> Clean:
    """The model's own forward (the frozen pass records here): activations, errors, logits."""
    names = [h for layer in range(lm.n_layers) for h in mlp_hooks(layer)]
    embed = lm.embed(tokens)
    logits, cache = lm.run_with_cache(inputs_embeds=embed, names=names, return_logits=True)
    acts, errors = [], []
    for layer in range(lm.n_layers):
        tc = transcoders[layer]
        x_in, y = (cache[h][0].to(tc.W_enc.dtype) for h in mlp_hooks(layer))
        a = tc.encode(x_in).detach()
        z = tc.pre_acts(x_in).detach()
        on = a != 0
        if not torch.allclose(a[on], z[on], rtol=1e-4, atol=1e-5 * float(z.abs().max()) + 1e-12):
            raise ConfigError(f"the transcoder of layer {layer} ({tc.cfg.arch}) passes on something other than the "
                              "pre-activation of its active features; a graph needs relu, topk, batchtopk or jumprelu")
        acts.append(a)
        errors.append((y - tc.decode(a)).detach())
    return Clean(embed[0].detach(), acts, errors, logits[0].detach())


def replay(lm: HookedLM, transcoders: dict, clean: Clean, scales: Scales) -> tuple[list[Tensor], Tensor]:
    """In the frozen model (after `state.replay()`): per layer feature pre-activations
    (seq, d_sae) and logits (seq, vocab) with each node's contribution multiplied by its scale."""
    def mlp_out(layer: int):
        tc = transcoders[layer]

        def splice(act: Tensor) -> Tensor:
            written = (clean.acts[layer] * scales.feats[layer]) @ tc.W_dec + tc.b_dec
            return (written + scales.errors[layer][:, None] * clean.errors[layer]).unsqueeze(0).to(act.dtype)
        return splice

    splices = {mlp_hooks(layer)[1]: mlp_out(layer) for layer in range(lm.n_layers)}
    names = [mlp_hooks(layer)[0] for layer in range(lm.n_layers)]
    embeds = (scales.embed[:, None] * clean.embed).unsqueeze(0)
    logits, cache = lm.run_with_cache(inputs_embeds=embeds, names=names, splices=splices, return_logits=True, grad=True)
    pre = [transcoders[layer].pre_acts(cache[names[layer]][0].to(transcoders[layer].W_enc.dtype))
           for layer in range(lm.n_layers)]
    return pre, logits[0]


class Attribution(NamedTuple):
    nodes: list[Node]
    adjacency: Tensor  # (n, n) float64: adjacency[t, s] = edge(s -> t)
    clean: Clean


def node_list(lm: HookedLM, clean: Clean, tokens: list[str], logit_id: int) -> list[Node]:
    """Embeddings, then per layer errors and active features, then the logit (a topological order)."""
    seq = clean.embed.shape[0]
    nodes = [Node("embedding", None, p, None, tokens[p], float(clean.embed[p].norm())) for p in range(seq)]
    for layer, (a, err) in enumerate(zip(clean.acts, clean.errors)):
        nodes += [Node("error", layer, p, None, tokens[p], float(err[p].norm())) for p in range(seq)]
        nodes += [Node("feature", layer, int(p), int(f), tokens[int(p)], float(a[p, f])) for p, f in a.nonzero().tolist()]
    logit = float(clean.logits[-1, logit_id])
    return nodes + [Node("logit", None, seq - 1, logit_id, _token(lm, logit_id), logit)]


def _token(lm: HookedLM, token_id: int) -> str:
    return lm.tokenizer.decode([int(token_id)]) if lm.tokenizer is not None else str(token_id)


def leaf_index(nodes: list[Node], scales: Scales) -> Tensor:
    """For each node, its entry in the leaves' gradients flattened and joined (`flat_grads`);
    the logit points at a final slot that is always 0."""
    seq, n_layers = scales.embed.shape[0], scales.errors.shape[0]
    offsets = [seq + n_layers * seq]
    for f in scales.feats[:-1]:
        offsets.append(offsets[-1] + f.numel())
    end = offsets[-1] + scales.feats[-1].numel()
    d_sae = [f.shape[1] for f in scales.feats]

    def index(n: Node) -> int:
        if n.kind == "embedding":
            return n.pos
        if n.kind == "error":
            return seq + n.layer * seq + n.pos
        return offsets[n.layer] + n.pos * d_sae[n.layer] + n.feature if n.kind == "feature" else end
    return torch.tensor([index(n) for n in nodes], dtype=torch.long)


def flat_grads(grads: tuple, leaves: list[Tensor]) -> Tensor:
    """The gradients of every leaf (zeros where unused) flattened and joined, plus a final 0."""
    parts = [(g if g is not None else torch.zeros_like(x)).reshape(-1).double() for g, x in zip(grads, leaves)]
    return torch.cat(parts + [torch.zeros(1, dtype=torch.float64)])


def attribute(lm: HookedLM, transcoders: dict, token_ids: Tensor, logit_id: int | None = None,
              progress: bool | None = None) -> Attribution:
    """Nodes and the exact adjacency matrix of the prompt `token_ids` (1, seq); `logit_id`
    None: the model's top prediction at the last position."""
    from saelab.progress import progress_bar

    check_transcoders(lm, transcoders)
    tokens = [_token(lm, t) for t in token_ids[0].tolist()]
    with frozen(lm) as state:
        clean = clean_pass(lm, transcoders, token_ids)
        state.replay()
        logit_id = int(clean.logits[-1].argmax()) if logit_id is None else int(logit_id)
        nodes = node_list(lm, clean, tokens, logit_id)
        scales = Scales.ones(clean, grad=True)
        pre, logits = replay(lm, transcoders, clean, scales)
        leaves, where = scales.leaves(), leaf_index(nodes, scales)
        adjacency = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
        targets = [(i, n) for i, n in enumerate(nodes) if n.kind in ("feature", "logit")]
        for i, node in progress_bar(targets, desc="edges", unit="node", enabled=progress):
            value = logits[-1, logit_id] if node.kind == "logit" else pre[node.layer][node.pos, node.feature]
            grads = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
            adjacency[i] = flat_grads(grads, leaves)[where]
            node.bias = float(value.detach()) - float(adjacency[i].sum())
    return Attribution(nodes, adjacency, clean)
