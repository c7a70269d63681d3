"""The `saelab` command. Each subcommand is a module of `saelab.commands` exposing
`register(subparsers)`, which adds its parser and sets `func`; adding a command is adding a
module and its line in COMMANDS, never editing another command. Options several commands
share are defined once, in `saelab.commands.options`."""

from __future__ import annotations

import argparse
import sys

from saelab.commands import (cache, compare, connections, count, dashboard, frontier, graph, logit_lens, maximize,
                             models, neurons, perturb, prune, quickstart, sparse_mlp, steer, tokens, toy, train)
from saelab.commands.options import shown
from saelab.errors import SaelabError

INTERRUPTED = 130  # the exit code shells give a job stopped by Ctrl-C (128 + SIGINT)
METRICS_DOC = "docs/metrics.md in the saelab source tree"

COMMANDS = [dashboard, neurons, quickstart, train, toy, count, prune, frontier, sparse_mlp, perturb, steer, logit_lens,
            tokens, compare, cache, models, connections, graph, maximize]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as every saelab command writes it: descriptions kept as written, and each option's
    default shown. Most help texts state their default in words (`saelab.commands.options`);
    an option whose help does not gets "(default: VALUE)" added here, so none goes without.
    `hidden_defaults`: the defaults `options.defaults_apart` keeps off argparse, by dest."""

    hidden_defaults: dict = {}

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = self.hidden_defaults.get(action.dest) if action.default is argparse.SUPPRESS else action.default
        if "default" in text or any(default is v for v in (None, False)) or not action.option_strings:
            return text
        return f"{text} (default: {shown(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit code 2), like saelab's own, and
    whose help shows every option's default (HelpFormatter; subcommands' parsers are Parsers too,
    and take it whatever formatter their module names)."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def _get_formatter(self) -> HelpFormatter:
        formatter = super()._get_formatter()
        formatter.hidden_defaults = self._defaults.get("option_defaults", {})
        return formatter

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="saelab",
                    description="Train, measure and interpret sparse autoencoders on language-model activations.",
                    epilog=f"What each column of the metrics tables means (formula, tokens counted, which way is "
                           f"better): {METRICS_DOC}")
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
