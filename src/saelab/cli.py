"""The `saelab` command. Each subcommand is a module of `saelab.commands` exposing
`register(subparsers)`, which adds its parser and sets `func`; adding a command is adding a
module and its line in COMMANDS, never editing another command. Options several commands
share are defined once, in `saelab.commands.options`."""

from __future__ import annotations

import argparse
import sys

from saelab.commands import (cache, compare, connections, count, dashboard, frontier, logit_lens, models, neurons,
                             perturb, prune, quickstart, sparse_mlp, steer, tokens, toy, train)
from saelab.errors import SaelabError

COMMANDS = [dashboard, neurons, quickstart, train, toy, count, prune, frontier, sparse_mlp, perturb, steer, logit_lens,
            tokens, compare, connections, cache, models]


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit code 2), like saelab's own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="saelab",
                    description="Train, measure and interpret sparse autoencoders on language-model activations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
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
