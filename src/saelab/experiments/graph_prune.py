"""Which nodes and edges of an attribution graph carry the effect on the logit.

Influence (as in the attribution-graph papers, computed our way): normalise |A| so each
target's incoming edges sum to 1 (W = |A| / row sums), then a source's influence on the logit is
the sum over all paths of the products of those shares, I = e_logit^T (W + W^2 + ...). The graph
is layered, so the series ends after n_layers + 2 terms. Nodes are kept in order of influence
until their cumulative share of the total reaches `node_threshold` (at most `max_nodes`); edges
between kept nodes are scored by their share times their target's influence (the logit counts 1)
and kept until `edge_threshold` of that score. The share of the influence the kept nodes carry is
what the command reports as kept; the error nodes' share says how much the transcoders miss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def influence(adjacency: Tensor, logit: int, depth: int) -> Tensor:
    """(n,) each node's indirect influence on node `logit` (its own entry 0)."""
    w = adjacency.abs()
    w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
    x = torch.zeros(adjacency.shape[0], dtype=torch.float64)
    x[logit] = 1.0
    total = torch.zeros_like(x)
    for _ in range(depth):
        x = x @ w
        if not bool(x.any()):
            break
        total += x
    return total


class Pruned(NamedTuple):
    nodes: list[int]  # kept node indices, in the graph's order (the logit included)
    edges: list[tuple[int, int]]  # kept (source, target)
    kept_fraction: float  # share of the total influence the kept nodes carry
    error_fraction: float  # share of the total influence on error nodes (all of them)
    influence: Tensor  # (n,) every node's share of the total influence (the logit's 0)


def prune(adjacency: Tensor, kinds: list[str], node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_nodes: int = 200, depth: int = 8) -> Pruned:
    """Keep the nodes carrying `node_threshold` of the logit's influence (at most `max_nodes`
    besides the logit), then the edges between them carrying `edge_threshold` of the edge score."""
    logit = kinds.index("logit")
    infl = influence(adjacency, logit, depth)
    total = float(infl.sum())
    order = torch.argsort(infl, descending=True).tolist()
    order = [i for i in order if i != logit and infl[i] > 0]
    kept, acc = [], 0.0
    for i in order:
        if acc >= node_threshold * total or len(kept) >= max_nodes:
            break
        kept.append(i)
        acc += float(infl[i])
    keep = sorted(kept + [logit])
    errors = sum(float(infl[i]) for i, k in enumerate(kinds) if k == "error")
    return Pruned(keep, _edges(adjacency, infl, keep, logit, edge_threshold), acc / total if total else 0.0,
                  errors / total if total else 0.0, infl / total if total else infl)


def _edges(adjacency: Tensor, infl: Tensor, keep: list[int], logit: int, threshold: float) -> list[tuple[int, int]]:
    idx = torch.tensor(keep)
    w = adjacency.abs()
    w = (w / w.sum(1, keepdim=True).clamp_min(1e-300))[idx][:, idx]
    weight = infl[idx].clone()
    weight[keep.index(logit)] = 1.0
    score = w * weight[:, None]
    flat = score.flatten()
    order = torch.argsort(flat, descending=True)
    total = float(flat.sum())
    cum = torch.cumsum(flat[order], 0)
    n = int((cum < threshold * total).sum()) + 1 if total else 0
    chosen = order[:n][flat[order[:n]] > 0]
    return sorted((keep[int(c) % len(keep)], keep[int(c) // len(keep)]) for c in chosen)
