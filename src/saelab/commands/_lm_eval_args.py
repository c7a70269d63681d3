"""Options shared by commands that run a language model on text: which model, which text,
how many contexts. Not a command itself (cli.COMMANDS does not list it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import heldout_contexts, load_lm


def add_lm_data_args(parser: argparse.ArgumentParser, eval_contexts: int = 64, out: str = "runs/out") -> None:
    """The shared options; `out` is the default output folder as the help shows it ("{sae}" in it
    stands for the SAE argument, filled in by `output_folder`)."""
    parser.add_argument("--model", default=None,
                        help="local Hugging Face model folder (default: the offline default LM, built on first use)")
    parser.add_argument("--source", default="stdlib",
                        help="text: 'stdlib', 'hf:NAME', a .txt/.jsonl file or a folder (default: stdlib)")
    parser.add_argument("--eval-contexts", type=int, default=eval_contexts,
                        help=f"held-out contexts to evaluate on (default: {eval_contexts})")
    parser.add_argument("--context-length", type=int, default=None,
                        help="tokens per context (default: min(128, the model's))")
    parser.add_argument("--include-bos", action="store_true",
                        help="keep the BOS position in averages and splices (default: excluded)")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per LM forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {out})")
    parser.set_defaults(out_default=out)


def output_folder(args: argparse.Namespace) -> Path:
    """--out, or the command's default with {sae} replaced by the SAE folder given."""
    if args.out is not None:
        return args.out
    return Path(args.out_default.format(sae=str(getattr(args, "sae", "")).rstrip("/")))


def model_and_eval_tokens(args: argparse.Namespace, sae=None):
    """(HookedLM, held-out contexts) from the shared options: --model, else the SAE's own model
    (saelab.lm.resolve)."""
    lm: HookedLM = load_lm(args.model, sae)
    tokens = heldout_contexts(lm, args.source, args.eval_contexts, args.context_length, split="heldout")
    return lm, tokens
