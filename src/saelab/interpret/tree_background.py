"""Definition trees without their generic parts (seed 003: "sample a huge number of points in
embedding space, generate the trees, keep rankings of the most common outputs and then filter
those").

Some continuations of `A typical definition of <ghost> is "` come out whatever the ghost is
("a", "a group of people who", ...): they say how the model defines anything, not what the
feature is. The background measures that once per model: `n_samples` random points in embedding
space, each at the same distance from the origin as a feature's tree vector (scale x the mean
token-embedding norm, embedding.feature_vectors) along a uniformly random direction, each grown
into a tree with the same prompt, depth and breadth. An output is a path from the root (the
continuation text up to a node); its share is the fraction of background trees that hold it.

Filtering a tree: a node whose output has a share >= `min_share` is generic. Generic nodes with
no specific descendant are dropped; generic nodes above a specific one stay, marked generic (they
are the context of the specific text). Every node keeps its `background` share, so a reader sees
why it went. The background is cached in $SAELAB_HOME/tree-backgrounds, one JSON file per model
and settings, written atomically; a second build of the same background is a read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.errors import ConfigError
from saelab.interpret.embedding import DEFAULT_PROMPT, definition_trees
from saelab.paths import saelab_home
from saelab.progress import progress_bar

FORMAT = 1
MIN_SHARE = 0.1  # default: an output in at least 10% of random points' trees is generic


@dataclass(frozen=True)
class BackgroundConfig:
    """The trees the background is grown from: they must match the trees it filters."""

    n_samples: int = 1024
    scale: float = 1.0
    depth: int = 3
    breadth: int = 3
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    chunk: int = 128  # points grown together

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.chunk < 1:
            raise ConfigError(f"n_samples and chunk must be >= 1, got {self.n_samples} and {self.chunk}")
        if not self.scale > 0:
            raise ConfigError(f"scale must be > 0, got {self.scale}")

    def key(self) -> dict:
        """What decides the background's content (chunk does not)."""
        return {k: v for k, v in asdict(self).items() if k != "chunk"}


def random_points(lm, n: int, scale: float, seed: int = 0) -> torch.Tensor:
    """(n, d_model) points at distance scale * (mean token-embedding norm) from the origin along
    uniformly random directions (normalised Gaussians)."""
    E = lm.W_E.detach().float()
    g = torch.randn(n, E.shape[1], generator=torch.Generator().manual_seed(seed))
    radius = E.norm(dim=1).mean().cpu()
    return (scale * radius * g / g.norm(dim=1, keepdim=True)).to(E.device)


def outputs(root: dict) -> set[str]:
    """Every output of a tree: the continuation text from the root to each node."""
    found: set[str] = set()
    stack = [(child, "") for child in root["children"]]
    while stack:
        node, before = stack.pop()
        text = before + node["text"]
        found.add(text)
        stack += [(child, text) for child in node["children"]]
    return found


def count_outputs(lm, cfg: BackgroundConfig, progress: bool | None = None) -> dict[str, int]:
    """{output: number of background trees holding it}, most common first."""
    points = random_points(lm, cfg.n_samples, cfg.scale, cfg.seed)
    counts: dict[str, int] = {}
    chunks = range(0, cfg.n_samples, cfg.chunk)
    for start in progress_bar(chunks, desc="tree background", unit="chunk", enabled=progress):
        for root in definition_trees(lm, points[start:start + cfg.chunk], depth=cfg.depth, breadth=cfg.breadth,
                                     prompt=cfg.prompt):
            for text in outputs(root):
                counts[text] = counts.get(text, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Background:
    """The background of one model: how many trees, and each output's count among them."""

    model: str | None
    config: dict
    n_trees: int
    counts: dict[str, int]

    def share(self, output: str) -> float:
        return self.counts.get(output, 0) / self.n_trees

    def ranking(self, n: int = 20) -> list[tuple[str, float]]:
        """The n most common outputs with their shares."""
        return [(text, c / self.n_trees) for text, c in list(self.counts.items())[:n]]


def background_file(lm, cfg: BackgroundConfig) -> Path:
    """$SAELAB_HOME/tree-backgrounds/<model>-<hash of model and settings>.json"""
    key = json.dumps({"model": lm.name, **cfg.key()}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(lm.name or "default")).name)[:60]
    return saelab_home() / "tree-backgrounds" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def tree_background(lm, cfg: BackgroundConfig | None = None, progress: bool | None = None,
                    rebuild: bool = False) -> Background:
    """The model's background for these settings: read from the cache, else built and cached."""
    cfg = cfg or BackgroundConfig()
    path = background_file(lm, cfg)
    if path.exists() and not rebuild:
        data = json.loads(path.read_text())
        if data.get("format") == FORMAT and data.get("config") == cfg.key() and data.get("model") == lm.name:
            return Background(data["model"], data["config"], data["n_trees"], data["counts"])
    counts = count_outputs(lm, cfg, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"format": FORMAT, "model": lm.name, "config": cfg.key(), "n_trees": cfg.n_samples,
                      "counts": counts})
    return Background(lm.name, cfg.key(), cfg.n_samples, counts)


def filter_tree(root: dict, background: Background, min_share: float = MIN_SHARE) -> dict:
    """A copy of the tree without its generic parts (module docstring); every node gains
    "background" (its output's share) and "generic" (kept only as a specific node's context)."""
    if not 0 < min_share <= 1:
        raise ConfigError(f"min_share must be in (0, 1], got {min_share}")

    def walk(node: dict, before: str) -> dict | None:
        text = before + node["text"]
        kids = [k for k in (walk(c, text) for c in node["children"]) if k is not None]
        share = background.share(text)
        generic = share >= min_share
        if generic and not kids:
            return None
        return {**node, "children": kids, "background": round(share, 4), "generic": generic}

    kids = [k for k in (walk(c, "") for c in root["children"]) if k is not None]
    return {**root, "children": kids}
