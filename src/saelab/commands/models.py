"""`saelab models`: prints the language models this machine can run offline — the default LM,
named models from installed packages (e.g. smollm2-135m) and converted GGUF folders — with their
size on disk and whether each is ready, built on first use, or how to install it. Writes
nothing. Any name shown is a valid `--model` for every command."""

from __future__ import annotations

import argparse

from saelab.lm.catalog import list_models
from saelab.tables import format_rows


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the LMs available offline (default, named, converted) with sizes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(format_rows([m.to_row() for m in list_models()], ("model", "kind", "size", "status", "path")))
    return 0
