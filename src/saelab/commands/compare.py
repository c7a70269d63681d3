"""`saelab compare RUN_OR_SAE [...]`: how much of each SAE's dictionary the others find (MMCS
between decoders, and the share of features matched above a cosine threshold), as matrices;
e.g. the widths of a sweep, to see which features every width learns.

Writes compare.json (--out; default: in the first folder given): the settings, the SAEs'
folders and every ordered pair's MMCS and shared fraction; prints both matrices."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.atomic import write_json
from saelab.commands import options
from saelab.experiments.compare import VECTORS, CompareConfig, compare_dictionaries, format_matrix
from saelab.sae import SAE
from saelab.sae.format import sae_folders


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="MMCS between the dictionaries of several SAEs (e.g. a width sweep)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+", metavar="RUN_OR_SAE",
                   help="SAE folders, or run folders (every SAE in their saes/)")
    p.add_argument("--threshold", type=float, default=CompareConfig().threshold,
                   help="cosine above which a feature counts as found (default: %(default)s)")
    p.add_argument("--vectors", choices=VECTORS, default=CompareConfig().vectors, help="feature directions to compare")
    options.add_out(p, "<first RUN_OR_SAE>/compare.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folders = [f for path in args.paths for f in sae_folders(path)]
    saes = {_name(f, folders): SAE.load(f) for f in folders}
    cfg = CompareConfig(threshold=args.threshold, vectors=args.vectors)
    entries = compare_dictionaries(saes, cfg)
    names = list(saes)
    print(f"MMCS: mean over the reference's {cfg.vectors} directions of the best cosine in the other dictionary\n")
    print(format_matrix(entries, names, "mmcs"))
    print(f"\nshare of the reference's features found above cosine {cfg.threshold:g}\n")
    print(format_matrix(entries, names, "shared"))
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent) / "compare.json"
    write_json(out, {"threshold": cfg.threshold, "vectors": cfg.vectors,
                     "saes": {n: str(f) for n, f in zip(names, folders)}, "pairs": entries})
    print(f"\nwrote {out}")
    return 0


def _name(folder: Path, folders: list[Path]) -> str:
    """The folder's name, or its last two parts where two SAEs share a name (two runs)."""
    same = [f for f in folders if f.name == folder.name]
    return folder.name if len(same) == 1 else f"{folder.parent.parent.name}/{folder.name}"
