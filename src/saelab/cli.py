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
    "compare",
    "cache",
    "models",
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
    _join_process_group()
    try:
        return int(args.func(args) or 0)
    except SaelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _join_process_group() -> None:
    """Under `torchrun --nproc_per_node N -m saelab.cli ...`, join the process group it set up
    (env:// rendezvous; nccl on GPUs, gloo otherwise): sweeps then shard their SAEs over ranks."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:  # rank 0 prints the results; the others would print the same
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
