"""How much of one dictionary another finds: MMCS between the decoders of several SAEs.

Without ground truth, the interim report's proxy for "features recovered" is agreement between
dictionaries: a feature that SAEs of different widths (or seeds, or L1) both learn is more
likely real. For every ordered pair (reference R, learned L): MMCS = the mean over R's
directions of the max cosine with any of L's, and `shared` = the share of R's directions that L
has above `threshold`. The widest SAE is the usual reference ("does the 2x dictionary hold
the 8x one's features?")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.errors import ConfigError
from saelab.evals.metrics import max_cosine
from saelab.sae import SAE

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
    first = max(len(corner), *(len(n) for n in names))
    widths = [max(6, len(n)) for n in names]
    rows = [f"{corner:<{first}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for r in names:
        vals = ["-" if r == c else f"{cell[(r, c)]:.3f}" for c in names]
        rows.append(f"{r:<{first}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(vals, widths)))
    return "\n".join(rows)
