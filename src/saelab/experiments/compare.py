"""How much of one dictionary another finds: MMCS between the decoders of several SAEs.

Without ground truth, the interim report's proxy for "features recovered" is agreement between
dictionaries: a feature that SAEs of different widths (or seeds, or L1) both learn is more
likely real. For every ordered pair (reference R, learned L): MMCS = the mean over R's
directions of the max cosine with any of L's, and `shared` = the share of R's directions that L
has above `threshold`. The widest SAE is the usual reference ("does the 2x dictionary hold
the 8x one's features?").

`run_compare` is the experiment behind `saelab compare`: the SAE folders of the paths given
(run folders stand for every SAE in their saes/), every ordered pair compared, compare.json
written; `format_compare` gives the MMCS and shared-feature matrices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from saelab.atomic import write_json
from saelab.errors import ConfigError
from saelab.evals.metrics import max_cosine
from saelab.sae import SAE
from saelab.sae.format import folder_labels, sae_folders
from saelab.tables import Column, format_rows

VECTORS = ("decoder", "encoder")


@dataclass
class CompareConfig:
    threshold: float = 0.9  # cosine above which a reference direction counts as found
    vectors: str = "decoder"  # which feature directions: decoder rows or encoder columns

    def __post_init__(self) -> None:
        if self.vectors not in VECTORS:
            raise ConfigError(f"vectors must be one of {VECTORS}, got {self.vectors!r}")
        if not -1 <= self.threshold <= 1:
            raise ConfigError(f"threshold is a cosine in [-1, 1], got {self.threshold}")


def directions(sae: SAE, vectors: str = "decoder") -> torch.Tensor:
    """(d_sae, d) feature directions: decoder rows, or encoder columns."""
    w = sae.W_dec if vectors == "decoder" else sae.W_enc.T
    return w.detach().float()


def compare_dictionaries(saes: dict[str, SAE], cfg: CompareConfig | None = None) -> list[dict]:
    """One entry per ordered pair (reference, learned) of distinct SAEs, in the order given."""
    cfg = cfg or CompareConfig()
    dirs = {name: directions(sae, cfg.vectors) for name, sae in saes.items()}
    out = []
    for ref, r in dirs.items():
        for learned, w in dirs.items():
            if ref == learned:
                continue
            best = max_cosine(w, r)
            out.append({"reference": ref, "learned": learned, "d_ref": r.shape[0], "d_learned": w.shape[0],
                        "mmcs": best.mean().item(), "shared": (best > cfg.threshold).float().mean().item()})
    return out


def format_matrix(entries: list[dict], names: list[str], key: str = "mmcs") -> str:
    """Rows: the reference dictionary; columns: the dictionary searched for its features."""
    cell = {(e["reference"], e["learned"]): e[key] for e in entries}
    corner = "reference / learned"
    rows = [{corner: r, **{c: "-" if r == c else cell[(r, c)] for c in names}} for r in names]
    return format_rows(rows, [corner, *(Column(n, fmt=".3f") for n in names)])


@dataclass
class CompareResult:
    cfg: CompareConfig
    saes: dict[str, Path]  # name -> SAE folder, in the order compared
    pairs: list[dict]  # compare_dictionaries' entries
    path: Path  # the compare.json written


def run_compare(paths: Sequence[str | Path], cfg: CompareConfig | None = None,
                out: str | Path | None = None) -> CompareResult:
    """Compare every SAE under `paths` (SAE folders, or run folders for all their saes/) with
    every other; writes compare.json to `out` (default: beside the first path)."""
    cfg, paths = cfg or CompareConfig(), [Path(p) for p in paths]
    folders = [f for path in paths for f in sae_folders(path)]
    saes = folder_labels(folders)
    pairs = compare_dictionaries({name: SAE.load(f) for name, f in saes.items()}, cfg)
    path = Path(out) if out is not None else (paths[0] if paths[0].is_dir() else paths[0].parent) / "compare.json"
    write_json(path, {"threshold": cfg.threshold, "vectors": cfg.vectors,
                      "saes": {n: str(f) for n, f in saes.items()}, "pairs": pairs})
    return CompareResult(cfg, saes, pairs, path)


def format_compare(result: CompareResult) -> str:
    """Both matrices (MMCS, and the share of features found above the threshold), explained."""
    names = list(result.saes)
    return "\n".join([
        f"MMCS: mean over the reference's {result.cfg.vectors} directions of the best cosine in the other dictionary\n",
        format_matrix(result.pairs, names, "mmcs"),
        f"\nshare of the reference's features found above cosine {result.cfg.threshold:g}\n",
        format_matrix(result.pairs, names, "shared"),
    ])
