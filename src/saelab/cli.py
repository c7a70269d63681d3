"""The `saelab` command. Each subcommand lives in `saelab.commands.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func`; adding a command is adding a
module and its name below, never editing another command."""

from __future__ import annotations

import argparse
import importlib
import sys

from saelab.errors import SaelabError

COMMANDS = [
    "dashboard",
    "quickstart",
    "train",
    "toy",
    "prune",
    "sparse_mlp",
    "perturb",
    "logit_lens",
    "tokens",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Train, measure and interpret sparse autoencoders on language-model activations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"saelab.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SaelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
