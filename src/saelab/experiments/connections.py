"""Connections between the features of two dictionaries at two layers (seed 002: "connecting a
feature in F2 to a feature in F1", "an activation*gradient method").

The model runs with the EARLY dictionary spliced in at the activation it writes (an SAE's hook,
a transcoder's output hook) as

    x = decode(f) + e,    f = early.encode(x_in),    e = x - decode(f)   (the error node)

which leaves the forward pass exactly as it was, and the LATE dictionary encodes the activation
at its input hook: g_j, late feature j's activation. With F_j = sum over the counted tokens of
g_j, the attribution of F_j to early feature i, and to the error, is activation x gradient summed
over the counted early positions:

    A_ji = sum_s f_i(s) dF_j/df_i(s),      A_j,err = sum_s e(s) . dF_j/de(s)

i.e. A_ji = d/de F_j(f_i scaled by 1 + eps at every counted position) at eps = 0: the first-order effect
of the node. For a linear path from the nodes to an active late feature the sum over the nodes,
error included, is exact: sum_i A_ji + A_j,err = F_j - (the part from the biases). The error
node is what keeps that sum honest: without it a poor reconstruction would hide.

Counted tokens are nodes and targets alike: every position but BOS (unless told), and not a row
the outlier rule flags at either hook (massive activations, saelab.data.outliers), judged once on
the clean pass; the other rows pass through the model as fixed inputs.

The strongest connections (by |A_ji|) are then confirmed by ablation: f_i set to 0 at every
counted position (the error held), the model rerun, and the change F_j(clean) - F_j(ablated) compared
with A_ji (the same quantity to first order): the share of signs that agree and the rank
correlation. Late features are batched by replicating the contexts, one copy per late feature,
so one backward pass serves a chunk of them (rows of a batch never interact).

`run_connections` returns a `ConnectionsResult` (experiments/connections_view.py: the typed
JSON, the text table and the HTML page).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.errors import ConfigError
from saelab.lm.hook_names import layer_of
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_one_model, check_sae_fits
from saelab.progress import progress_bar

# (f (N, S, d_sae), e (N, S, d)) -> the nodes the model is run with, same shapes
NodeEdit = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class ConnectionsConfig:
    late_features: list[int] | None = None  # None: the n_late most active late features
    n_late: int = 16
    n_ablate: int = 24  # strongest connections confirmed by ablation
    per_late: int = 5  # strongest early features listed per late feature
    n_examples: int = 3  # top contexts shown per feature on the page
    batch_size: int = 8  # contexts per forward
    feature_chunk: int = 8  # late features per backward pass (the batch is replicated this many times)
    exclude_bos: bool = True  # position 0 is neither a node nor a target
    # rows whose norm at either hook is above this x the median (massive activations, e.g. document
    # separators: saelab.data.outliers) are neither nodes nor targets; None: every row counts
    outlier_multiple: float | None = DEFAULT_MULTIPLE

    def __post_init__(self) -> None:
        for name in ("n_late", "batch_size", "feature_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_ablate", "per_late", "n_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.outlier_multiple = OutlierRule(self.outlier_multiple).multiple


class Pair(NamedTuple):
    """Two dictionaries of one model and where they sit: the early one's input hook and the
    hook it writes (its nodes), the late one's input hook."""

    early: object  # SAE
    late: object  # SAE
    early_in: str
    early_out: str
    late_in: str


def check_layer_order(early, late) -> None:
    """Before any model is loaded: EARLY's output must not sit in a later block than LATE's input
    (read off the hook names; check_pair later checks the exact order in the model)."""
    early_out = early.cfg.hook_name_out or early.cfg.hook_name
    layers = [layer_of(early_out), layer_of(late.cfg.hook_name)]
    if None not in layers and layers[0] > layers[1]:
        raise ConfigError(f"EARLY writes {early_out} (block {layers[0]}) but LATE reads {late.cfg.hook_name} "
                          f"(block {layers[1]}): give the earlier layer's dictionary first")


def check_pair(lm: HookedLM, early, late) -> Pair:
    """The Pair, after checking that both dictionaries come from one model and fit it, and that
    the early one's output is computed before the late one's input."""
    check_one_model({"EARLY": early, "LATE": late})
    early_in, early_out = check_sae_fits(lm, early)
    late_in, _ = check_sae_fits(lm, late)
    names = lm.hook_names()
    if names.index(early_out) >= names.index(late_in):
        raise ConfigError(f"EARLY writes {early_out} but LATE reads {late_in}, which the model does not compute "
                          "later: give the earlier layer's dictionary first")
    return Pair(early, late, early_in, early_out, late_in)


def check_features(features, d_sae: int, what: str) -> list[int]:
    feats = [int(j) for j in features]
    bad = [j for j in feats if not 0 <= j < d_sae]
    if bad or not feats:
        raise ConfigError(f"{what} features must be in 0..{d_sae - 1}, got {feats}")
    return feats


def position_weights(seq: int, exclude_bos: bool, device=None) -> Tensor:
    """(seq,) 1 where a position counts (as a node and as a target), 0 at BOS when excluded."""
    w = torch.ones(seq, device=device)
    if exclude_bos:
        w[0] = 0
    return w


def token_weights(shape, exclude_bos: bool, counted: Tensor | None, like: Tensor) -> Tensor:
    """(n, seq) weights of the tokens that count, in `like`'s dtype and device: `counted`
    (n, seq) bool if given (BOS and outlier rows left out), else every position but BOS."""
    if counted is not None:
        return counted.to(like.device, like.dtype)
    return position_weights(shape[1], exclude_bos, like.device).to(like.dtype).expand(shape[0], -1)


def spliced_late_acts(lm: HookedLM, pair: Pair, tokens: Tensor, edit: NodeEdit | None = None,
                      grad: bool = False, record: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(f, e, g): the early nodes the model ran with (after `edit`) and the late features
    (N, S, d_late_sae), from one forward stopped at the late hook; `record` receives the
    activations at the two hooks ("early", "late")."""
    seen: dict[str, Tensor] = {}

    def read_input(act):
        seen["x_in"] = act
        return act

    def write_nodes(act):
        x_in = seen.get("x_in", act)
        f = pair.early.encode(x_in)
        e = act - pair.early.decode(f)
        if edit is not None:
            f, e = edit(f, e)
        seen["f"], seen["e"], seen["early"] = f, e, act
        return pair.early.decode(f) + e

    splices = {pair.early_out: write_nodes}
    if pair.early_in != pair.early_out:
        splices = {pair.early_in: read_input, **splices}
    cache = lm.run_with_cache(tokens, [pair.late_in], splices=splices, grad=grad)
    if record is not None:
        record.update(early=seen["early"], late=cache[pair.late_in])
    return seen["f"], seen["e"], pair.late.encode(cache[pair.late_in])


def late_totals(lm: HookedLM, pair: Pair, tokens: Tensor, edit: NodeEdit | None = None,
                exclude_bos: bool = True, counted: Tensor | None = None) -> Tensor:
    """(d_late_sae,) F_j: each late feature summed over the counted tokens of `tokens`
    (`counted` (n, seq) bool, else every position but BOS if excluded)."""
    with torch.no_grad():
        _, _, g = spliced_late_acts(lm, pair, tokens, edit)
    return torch.einsum("nsd,ns->d", g, token_weights(g.shape, exclude_bos, counted, g))


def attribute(lm: HookedLM, pair: Pair, tokens: Tensor, late: list[int],
              exclude_bos: bool = True, counted: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(A (m, d_early_sae), A_err (m,), F (m,)) for the m late features `late` over `tokens`
    (N, S), nodes and targets at the counted tokens only (as in late_totals): one forward and
    one backward, the contexts replicated once per late feature."""
    m, (n, seq) = len(late), tokens.shape
    leaves: dict[str, Tensor] = {}

    def as_leaves(f, e):
        leaves["f"], leaves["e"] = f.detach().requires_grad_(), e.detach().requires_grad_()
        return leaves["f"], leaves["e"]

    _, _, g = spliced_late_acts(lm, pair, tokens.repeat(m, 1), as_leaves, grad=True)
    w = token_weights((n, seq), exclude_bos, counted, g)
    picked = g.view(m, n, seq, -1)[torch.arange(m), :, :, torch.as_tensor(late)]  # (m, n, seq)
    totals = torch.einsum("mns,ns->m", picked, w)
    grad_f, grad_e = torch.autograd.grad(totals.sum(), [leaves["f"], leaves["e"]])
    f, e = leaves["f"].detach(), leaves["e"].detach()
    wf = w.to(f.dtype).repeat(m, 1)[:, :, None]
    attr = (f * grad_f * wf).view(m, n, seq, -1).sum((1, 2))
    attr_err = (e * grad_e * wf).view(m, n, seq, -1).sum((1, 2, 3))
    return attr, attr_err, totals.detach()


def zero_feature(i: int, exclude_bos: bool = True, counted: Tensor | None = None) -> NodeEdit:
    """The edit that ablates early feature i (at the counted tokens), the error held."""
    def edit(f, e):
        keep = torch.ones(f.shape[-1], dtype=f.dtype, device=f.device)
        keep[i] = 0
        w = token_weights(f.shape, exclude_bos, counted, f)[:, :, None]
        return f * (1 - w * (1 - keep)), e
    return edit


def scale_node(node: int | str, factor: float, exclude_bos: bool = True, counted: Tensor | None = None) -> NodeEdit:
    """The edit that scales early feature `node` (or the error, node="error") by `factor` at the
    counted tokens: d/d factor of F_j at 1 is the attribution (finite differences)."""
    def edit(f, e):
        w = token_weights(f.shape, exclude_bos, counted, f)[:, :, None]
        if node == "error":
            return f, e * (1 + (factor - 1) * w.to(e.dtype))
        col = torch.zeros(f.shape[-1], dtype=f.dtype, device=f.device)
        col[int(node)] = factor - 1
        return f * (1 + w.to(f.dtype) * col), e
    return edit


def ablation_effects(lm: HookedLM, pair: Pair, contexts: Tensor, early: list[int], late: list[int],
                     cfg: ConnectionsConfig, clean: Tensor, counted: Tensor, progress: bool | None = None) -> Tensor:
    """(len(early), len(late)) F_j(clean) - F_j(early feature i ablated), over `contexts` and
    their `counted` tokens; `clean` is (d_late_sae,) F over the same."""
    out = torch.zeros(len(early), len(late), dtype=torch.float64)
    idx = torch.as_tensor(late)
    for r, i in enumerate(progress_bar(early, desc="ablation", unit="feature", enabled=progress)):
        ablated = sum(late_totals(lm, pair, contexts[s:s + cfg.batch_size],
                                  zero_feature(i, cfg.exclude_bos, counted[s:s + cfg.batch_size]),
                                  cfg.exclude_bos, counted[s:s + cfg.batch_size])
                      for s in range(0, len(contexts), cfg.batch_size))
        out[r] = (clean[idx] - ablated[idx]).double().cpu()
    return out


class PairScan(NamedTuple):
    """One clean pass over the contexts: totals F of every early and late feature over the
    counted tokens, each feature's max per context (N, d_sae) with its position, and which
    tokens count (N, S): not BOS (if excluded), and not an outlier row at either hook."""

    early_total: Tensor
    late_total: Tensor
    early_max: Tensor
    early_pos: Tensor
    late_max: Tensor
    late_pos: Tensor
    counted: Tensor


def counted_tokens(acts: dict, exclude_bos: bool, multiple: float | None) -> Tensor:
    """(n, S) bool: tokens that are nodes and targets, from the clean activations at both hooks."""
    x = acts["early"]
    keep = position_weights(x.shape[1], exclude_bos, x.device).bool().expand(x.shape[0], -1).clone()
    rule = OutlierRule(multiple)
    for act in acts.values():
        keep &= ~rule.position_mask(act, int(exclude_bos))
    return keep


@torch.no_grad()
def scan_pair(lm: HookedLM, pair: Pair, contexts: Tensor, cfg: ConnectionsConfig) -> PairScan:
    parts: dict[str, list[Tensor]] = {k: [] for k in PairScan._fields}
    for s in range(0, len(contexts), cfg.batch_size):
        hooks: dict[str, Tensor] = {}
        f, _, g = spliced_late_acts(lm, pair, contexts[s:s + cfg.batch_size], record=hooks)
        counted = counted_tokens(hooks, cfg.exclude_bos, cfg.outlier_multiple)
        parts["counted"].append(counted.cpu())
        for name, acts in (("early", f), ("late", g)):
            w = counted.to(acts.dtype)
            parts[f"{name}_total"].append(torch.einsum("nsd,ns->d", acts, w).double().cpu())
            best = (acts - (1 - w)[:, :, None] * 1e30).max(dim=1)  # counted tokens only
            parts[f"{name}_max"].append(best.values.clamp_min(0).float().cpu())
            parts[f"{name}_pos"].append(best.indices.cpu())
    return PairScan(*(torch.stack(parts[k]).sum(0) if k.endswith("total") else torch.cat(parts[k])
                      for k in PairScan._fields))


def pick_late(scan: PairScan, cfg: ConnectionsConfig, d_late: int) -> list[int]:
    """The late features asked for, else the n_late with the largest total activation."""
    if cfg.late_features is not None:
        return check_features(cfg.late_features, d_late, "LATE")
    active = int((scan.late_total > 0).sum())
    if not active:
        raise ConfigError("no LATE feature is active on these contexts: give more text or check the SAE")
    return scan.late_total.topk(min(cfg.n_late, active)).indices.tolist()


def attribute_all(lm: HookedLM, pair: Pair, contexts: Tensor, late: list[int], cfg: ConnectionsConfig,
                  counted: Tensor, progress: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """attribute() summed over batches of contexts and chunks of late features: (A, A_err, F)
    as float64 on the CPU, rows in the order of `late`."""
    chunks = [late[c:c + cfg.feature_chunk] for c in range(0, len(late), cfg.feature_chunk)]
    batches = [(contexts[s:s + cfg.batch_size], counted[s:s + cfg.batch_size])
               for s in range(0, len(contexts), cfg.batch_size)]
    A = torch.zeros(len(late), pair.early.cfg.d_sae, dtype=torch.float64)
    A_err, F = torch.zeros(len(late), dtype=torch.float64), torch.zeros(len(late), dtype=torch.float64)
    steps = [(c, b) for c in range(len(chunks)) for b in batches]
    for c, (batch, mask) in progress_bar(steps, desc="attribution", unit="batch", enabled=progress):
        rows = slice(c * cfg.feature_chunk, c * cfg.feature_chunk + len(chunks[c]))
        a, a_err, f = attribute(lm, pair, batch, chunks[c], cfg.exclude_bos, mask)
        A[rows] += a.double().cpu()
        A_err[rows] += a_err.double().cpu()
        F[rows] += f.double().cpu()
    return A, A_err, F


def strongest(A: Tensor, n: int) -> list[tuple[int, int]]:
    """(row of A, early feature) of the n largest |A|, strongest first (non-zero only)."""
    flat = A.abs().flatten()
    top = flat.topk(min(n, int((flat > 0).sum())))
    return [(int(k) // A.shape[1], int(k) % A.shape[1]) for k in top.indices]


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Rank correlation of two 1-d tensors (None for fewer than 3 values or a constant one)."""
    if a.numel() < 3:
        return None
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denom if denom else None


def run_connections(lm: HookedLM, early, late, contexts, cfg: ConnectionsConfig | None = None,
                    progress: bool | None = None, dashboards=(None, None), folders=(None, None)):
    """Attribute, ablate and collect examples; returns a connections_view.ConnectionsResult.
    `early` and `late` are SAEs or their folders (`folders` names them when SAEs are given);
    `dashboards` their dashboard folders (default: `<folder>/dashboard`)."""
    from saelab.experiments.connections_view import build_result
    from saelab.sae import SAE

    cfg = cfg or ConnectionsConfig()
    folders = tuple(f if isinstance(s, torch.nn.Module) else s for s, f in zip((early, late), folders))
    early, late = (s if isinstance(s, torch.nn.Module) else SAE.load(s).eval().to(lm.device) for s in (early, late))
    pair = check_pair(lm, early, late)
    contexts = torch.as_tensor(contexts).to(lm.device)
    if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.shape[1] < 1 + cfg.exclude_bos:
        raise ConfigError(f"contexts must be a non-empty (n, seq) token array, got shape {tuple(contexts.shape)}")
    scan = scan_pair(lm, pair, contexts, cfg)
    counted = scan.counted.to(lm.device)
    late_feats = pick_late(scan, cfg, late.cfg.d_sae)
    A, A_err, F = attribute_all(lm, pair, contexts, late_feats, cfg, counted, progress)
    top = strongest(A, cfg.n_ablate)
    early_ablated = sorted({i for _, i in top})
    effects = ablation_effects(lm, pair, contexts, early_ablated, late_feats, cfg,
                               scan.late_total.to(lm.device), counted, progress) if top else None
    delta = {(r, i): effects[early_ablated.index(i), r].item() for r, i in top}
    return build_result(lm, pair, contexts, scan, late_feats, (A, A_err, F), delta, cfg, folders, dashboards)
