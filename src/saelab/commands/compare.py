"""`saelab compare RUN_OR_SAE [...]`: how much of each SAE's dictionary the others find (MMCS
between decoders, and the share of features matched above a cosine threshold), as matrices;
e.g. the widths of a sweep, to see which features every width learns.

Writes compare.json (--out; default: in the first folder given): the settings, the SAEs'
folders and every ordered pair's MMCS and shared fraction; prints both matrices."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.commands import options
from saelab.experiments.compare import VECTORS, CompareConfig, format_compare, run_compare


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="MMCS between the dictionaries of several SAEs (e.g. a width sweep)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+", metavar="RUN_OR_SAE",
                   help="SAE folders, or run folders (every SAE in their saes/)")
    p.add_argument("--threshold", type=float, default=CompareConfig().threshold,
                   help="cosine above which a feature counts as found (default: %(default)s)")
    p.add_argument("--vectors", choices=VECTORS, default=CompareConfig().vectors, help="feature directions to compare")
    options.add_out(p, "<first RUN_OR_SAE>/compare.json", file=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_compare(args.paths, CompareConfig(threshold=args.threshold, vectors=args.vectors), args.out)
    print(format_compare(result))
    print(f"\nwrote {result.path}")
    return 0
