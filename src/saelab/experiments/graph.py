"""`saelab graph PROMPT`: the prompt's attribution graph through transcoders at every layer,
pruned to the nodes that carry most of the influence on one logit, as JSON and an HTML page.

`graph_attribution` builds the exact graph (features, error nodes, token embeddings, the
logit; edges are direct effects in the model with attention patterns and norm scales frozen),
`graph_prune` ranks and prunes it, `graph_view` draws it (nodes link to the features'
dashboards when given). Output folder: graph.json (a `GraphResult`) and graph.html.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.errors import ConfigError, DataError, MissingFileError
from saelab.experiments.graph_attribution import Node, attribute, mlp_hooks
from saelab.experiments.graph_prune import prune
from saelab.lm.hook_names import parse_hook
from saelab.lm.hooked import HookedLM
from saelab.tables import Column, format_rows

LOW_KEPT = 0.5  # below this share of the influence kept, the summary warns whatever was asked


@dataclass
class GraphConfig:
    prompt: str
    logit: str | None = None  # the token whose logit is explained; None: the top prediction
    node_threshold: float = 0.8  # cumulative share of the logit's influence the kept nodes reach
    edge_threshold: float = 0.98  # cumulative share of the edge score the kept edges reach
    max_nodes: int = 200  # kept nodes at most (besides the logit)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConfigError("the prompt is empty; give the text whose graph to build")
        for name in ("node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.max_nodes < 1:
            raise ConfigError(f"max_nodes must be >= 1, got {self.max_nodes}")


@dataclass
class GraphEdge:
    source: str  # Node.key()
    target: str
    weight: float  # the direct effect of the source on the target's pre-activation (or logit)


@dataclass
class GraphResult:
    prompt: str
    model: str
    tokens: list[str]  # the prompt's tokens, BOS first
    logit_token: str
    logit: float
    logit_prob: float  # its probability at the last position
    n_layers: int
    transcoders: dict[int, str]  # layer -> folder
    node_threshold: float
    kept_fraction: float  # share of the logit's influence on the kept nodes
    error_fraction: float  # share on error nodes (kept or not)
    total_nodes: int
    total_edges: int  # nonzero edges before pruning
    nodes: list[Node]  # the kept ones
    edges: list[GraphEdge]
    links: dict[str, str] = field(default_factory=dict)  # node key -> dashboard page, relative to graph.html
    warning: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "nodes": [{"key": n.key(), **asdict(n)} for n in self.nodes]}


# ---- inputs ---------------------------------------------------------------------------------
def prompt_tokens(lm: HookedLM, prompt: str) -> torch.Tensor:
    """(1, n) ids: BOS, as contexts are packed, then the prompt's tokens; must fit the context."""
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give the text whose graph to build")
    bos = [lm.bos_token_id] if lm.bos_token_id is not None else []
    ids = bos + lm.tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) > lm.context_length:
        raise DataError(f"the prompt is {len(ids)} tokens with BOS, longer than the model's context of "
                        f"{lm.context_length}; shorten it")
    return torch.tensor([ids], dtype=torch.long, device=lm.device)


def logit_id(lm: HookedLM, token: str | None) -> int | None:
    """The id of `token` (one token: as text, e.g. " def", or as the tokenizer spells it)."""
    if token is None:
        return None
    ids = lm.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    tid = lm.tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != lm.tokenizer.unk_token_id and 0 <= tid < lm.d_vocab:
        return tid
    raise ConfigError(f"--logit {token!r} is {len(ids)} tokens ({[lm.tokenizer.decode([i]) for i in ids]}); give one token")


def load_transcoders(paths: list[str | Path]) -> dict[int, tuple[str, object]]:
    """{layer: (folder, SAE)} from SAE folders or folders holding them (a `saelab sparse-mlp`
    run: layer<L>/saes/<label>/); the layer is the one whose MLP a transcoder replaces."""
    from saelab.sae import SAE

    folders = []
    for p in map(Path, paths):
        if (p / "cfg.json").is_file():
            folders.append(p)
        elif p.is_dir():
            folders += sorted(c.parent for c in p.glob("**/saes/*/cfg.json"))
        else:
            raise MissingFileError(f"{p} does not exist")
    if not folders:
        raise MissingFileError(f"no SAE folder (cfg.json) in {', '.join(map(str, paths))}")
    out: dict[int, tuple[str, object]] = {}
    for folder in folders:
        sae = SAE.load(folder).eval()
        layer = parse_hook(sae.cfg.hook_name).layer if sae.cfg.hook_name else None
        if layer is None or sae.cfg.hook_name_out != mlp_hooks(layer)[1]:
            raise ConfigError(f"{folder} reads {sae.cfg.hook_name} and writes {sae.cfg.hook_name_out}: not a transcoder of "
                              "an MLP (reading blocks.L.ln2.hook_normalized, writing blocks.L.hook_mlp_out)")
        if layer in out:
            raise ConfigError(f"two transcoders for layer {layer}: {out[layer][0]} and {folder}; give one per layer")
        out[layer] = (str(folder), sae)
    return out


def dashboard_pages(dirs: list[str | Path], out_dir: Path) -> dict[int, Path]:
    """{layer: features folder of its dashboard} from `saelab dashboard` folders (report.json
    says which hook each one's SAE reads), as paths relative to `out_dir`."""
    pages = {}
    for d in map(Path, dirs):
        report = d / "report.json"
        if not report.is_file():
            raise MissingFileError(f"{d} is not a dashboard folder (no report.json); give what `saelab dashboard` wrote")
        hook = (json.loads(report.read_text()).get("sae") or {}).get("hook_name") or ""
        layer = parse_hook(hook).layer if hook.startswith("blocks.") else None
        if layer is not None:
            pages[layer] = Path(os.path.relpath(d / "features", out_dir))
    return pages


# ---- the experiment -------------------------------------------------------------------------
def run_graph(lm: HookedLM, transcoders: dict[int, tuple[str, object]], cfg: GraphConfig, out_dir: str | Path,
              dashboards: list[str | Path] = (), progress: bool | None = None) -> GraphResult:
    """Build, prune and write the graph of `cfg.prompt` into `out_dir` (graph.json, graph.html)."""
    from saelab.experiments.graph_view import write_graph_page

    out = Path(out_dir)
    tokens = prompt_tokens(lm, cfg.prompt)
    out.mkdir(parents=True, exist_ok=True)  # dashboard links are checked relative to it
    saes = {layer: sae.to(lm.device, lm.W_E.dtype) for layer, (_, sae) in transcoders.items()}
    att = attribute(lm, saes, tokens, logit_id(lm, cfg.logit), progress=progress)
    kinds = [n.kind for n in att.nodes]
    kept = prune(att.adjacency, kinds, cfg.node_threshold, cfg.edge_threshold, cfg.max_nodes, depth=lm.n_layers + 2)
    for node, share in zip(att.nodes, kept.influence.tolist()):
        node.influence = share
    logit_node = att.nodes[-1]
    logit_tok = logit_node.feature
    result = GraphResult(
        prompt=cfg.prompt, model=lm.name, tokens=[n.token for n in att.nodes if n.kind == "embedding"],
        logit_token=logit_node.token, logit=logit_node.value,
        logit_prob=float(torch.softmax(att.clean.logits[-1].double(), -1)[logit_tok]), n_layers=lm.n_layers,
        transcoders={layer: path for layer, (path, _) in sorted(transcoders.items())},
        node_threshold=cfg.node_threshold, kept_fraction=kept.kept_fraction, error_fraction=kept.error_fraction,
        total_nodes=len(att.nodes), total_edges=int((att.adjacency != 0).sum()),
        nodes=[att.nodes[i] for i in kept.nodes],
        edges=[GraphEdge(att.nodes[s].key(), att.nodes[t].key(), float(att.adjacency[t, s])) for s, t in kept.edges],
        links=_links(att.nodes, kept.nodes, dashboard_pages(list(dashboards), out), out))
    result.warning = kept_warning(result, cfg)
    write_json(out / "graph.json", result.to_dict())
    write_graph_page(result, out / "graph.html")
    return result


def _links(nodes: list[Node], kept: list[int], pages: dict[int, Path], out: Path) -> dict[str, str]:
    """Kept feature nodes whose layer has a dashboard with a page for them -> that page."""
    links = {}
    for i in kept:
        n = nodes[i]
        if n.kind == "feature" and n.layer in pages and (out / pages[n.layer] / f"{n.feature}.html").is_file():
            links[n.key()] = (pages[n.layer] / f"{n.feature}.html").as_posix()
    return links


def kept_warning(result: GraphResult, cfg: GraphConfig) -> str | None:
    """A sentence when the pruned graph keeps too little of the logit's influence."""
    if result.kept_fraction < min(cfg.node_threshold - 1e-9, LOW_KEPT) or (
            result.kept_fraction < cfg.node_threshold - 1e-9 and len(result.nodes) - 1 >= cfg.max_nodes):
        return (f"the pruned graph keeps only {result.kept_fraction:.1%} of the influence on the logit (asked for "
                f"{cfg.node_threshold:.0%}); --max-nodes {cfg.max_nodes} cut it: raise --max-nodes")
    return None


NODE_TABLE = (Column("kind"), Column("layer"), Column("pos"), Column("token"), Column("feature"),
              Column("value", "value", ".3g"), Column("influence", "influence", ".3f"))


def format_graph(result: GraphResult, top: int = 15) -> str:
    """The summary the command prints: the logit, what was kept, the most influential nodes."""
    from saelab.interpret.dashboard import visible_token

    nodes = sorted((n for n in result.nodes if n.kind != "logit"), key=lambda n: -n.influence)[:top]
    rows = [{**asdict(n), "token": visible_token(n.token)} for n in nodes]
    lines = [f"prompt: {''.join(visible_token(t) for t in result.tokens)}",
             f"logit: {visible_token(result.logit_token)} = {result.logit:.4g} (p = {result.logit_prob:.3f}) at the last position",
             f"graph: {result.total_nodes} nodes, {result.total_edges} edges; kept {len(result.nodes)} nodes and "
             f"{len(result.edges)} edges carrying {result.kept_fraction:.1%} of the influence on the logit "
             f"(threshold {result.node_threshold:.0%}); error nodes carry {result.error_fraction:.1%}",
             "", format_rows(rows, NODE_TABLE)]
    if result.warning:
        lines += ["", f"warning: {result.warning}"]
    return "\n".join(lines)
