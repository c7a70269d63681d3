"""The `saelab` command. Each subcommand is a module of `saelab.commands` exposing
`register(subparsers)`, which adds its parser and sets `func`; adding a command is adding a
module and its line in COMMANDS, never editing another command. Options several commands
share are defined once, in `saelab.commands.options`."""

from __future__ import annotations

import argparse
import sys

from saelab.commands import (cache, compare, count, dashboard, frontier, logit_lens, models, neurons, perturb, prune,
                             quickstart, sparse_mlp, steer, tokens, toy, train)
from saelab.errors import SaelabError

INTERRUPTED = 130  # the exit code shells give a job stopped by Ctrl-C (128 + SIGINT)

COMMANDS = [dashboard, neurons, quickstart, train, toy, count, prune, frontier, sparse_mlp, perturb, steer, logit_lens,
            tokens, compare, cache, models]


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
    """Run one command. What a user can get wrong ends in one line on stderr and exit code 2:
    saelab's own errors, and the operating system refusing a file (a folder that is a file,
    a read-only disk, a full one); Ctrl-C ends in one line (saying what was kept) and 130."""
    try:
        args = build_parser().parse_args(argv)
        _join_process_group()
        return int(args.func(args) or 0)
    except SaelabError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {one_line(os_error(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"interrupted: {one_line(str(err)) or 'stopped by Ctrl-C'}", file=sys.stderr)
        return INTERRUPTED


def one_line(text: str) -> str:
    """`text` on one line (a message quoting another library's may hold several)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def os_error(err: OSError) -> str:
    """An OSError as one line: what the system said, and about which path."""
    what = err.strerror or str(err)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{what}: {' -> '.join(str(p) for p in paths)}" if paths else what


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
