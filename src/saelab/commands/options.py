"""Options shared by the commands, each defined once here: one name, one meaning, one help text.

A command passes the default it wants (read from the config dataclass the value feeds, so
the help and the library agree); help texts write defaults out literally rather than with
`%(default)s`, because commands that read a --config file hide their defaults from argparse
(`defaults_apart`) to tell what was typed from what was not.

Not a command: cli.py does not list it, and it imports no command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path

from saelab.data.outliers import OutlierRule
from saelab.data.provenance import Provenance
from saelab.data.toy import ToyDataConfig
from saelab.errors import ConfigError
from saelab.interpret.report import TREE_VECTORS, ReportOptions
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits, heldout_contexts, load_lm
from saelab.sae import SAE
from saelab.sae.architectures import ACTIVATIONS
from saelab.train.spec import TrainSpec
from saelab.train.sweep import SWEEP_DEFAULTS_HELP

LM_DTYPES = ("float32", "bfloat16", "float16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
DEVICE_TYPES = ("cpu", "cuda", "mps")
EVAL_CONTEXTS = 64  # held-out contexts an evaluation reads unless told (as heldout_contexts' default)
SPEC_AXES = ("arch", "expansion", "d_sae", "coefficient", "k")  # swept: many values each


# ---- value checks (argparse `type=`: a bad value is a one-line usage error) ----------------
def check_device(text: str) -> str:
    """`text` if torch can place tensors there on this machine, else a ConfigError saying why."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N, mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"unsupported device {text!r}; valid: cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {text!r}: MPS is not available on this machine")
    return text


def _device(text: str) -> str:
    try:
        return check_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(convert, valid, words: str, name: str):
    """An argparse `type=` for numbers: `convert`ed, and refused (one line, saying `words`)
    unless `valid` holds, so a 0 where a count is meant fails here, not later as an empty
    corpus or run."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer", "positive_int")  # counts
positive_float = _number(float, lambda v: v > 0, "a positive number", "positive_float")  # sizes (width multiples)
non_negative_int = _number(int, lambda v: v >= 0, "0 or a positive integer", "non_negative_int")


def shown(value) -> str:
    """A default as --help shows it: lists space-separated, as they are typed."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


# ---- the language model and its text --------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype: which LM runs, where, at what precision."""
    g = p.add_argument_group("language model")
    g.add_argument("--model", default=None,
                   help="a Hugging Face model folder, a .gguf file, a named model (smollm2-135m) or build (minuscule; see "
                        "`saelab models`), 'default' (the offline default LM), or any other name, which is taken as a "
                        "Hugging Face hub id (e.g. EleutherAI/pythia-70m) and downloaded, so it needs the internet: "
                        "offline, it fails with an error naming it (default: for an SAE, the model it records; else "
                        "the offline default LM, built on first use)")
    g.add_argument("--device", type=_device, default="cpu",
                   help="where the LM runs (and, for training, the SAEs): cpu, cuda, cuda:N, mps (default: cpu)")
    g.add_argument("--dtype", choices=LM_DTYPES, default="float32",
                   help="the LM's parameter dtype (default: float32)")


def text_group(p: argparse.ArgumentParser):
    return p.add_argument_group("text")


def _from_sae(default_text: str, from_sae: bool) -> str:
    """A default as --help shows it, for an option that defaults to the SAE's recorded value."""
    return f"the SAE's recorded one, else {default_text}" if from_sae else default_text


def add_source(g, default: str = "stdlib", from_sae: bool = False) -> None:
    g.add_argument("--source", default=default,
                   help="text: 'stdlib' (Python source), 'stdlib-docs' (English: the stdlib's docstrings and "
                        f"reference topics), 'hf:NAME', a .txt/.jsonl file or a folder (default: {_from_sae(default, from_sae)})")


def add_hook(g, default: str | None = None) -> None:
    g.add_argument("--hook", default=default,
                   help="TransformerLens hook name, e.g. blocks.2.mlp.hook_post (default: "
                        f"{default or 'resid_post of the middle layer'})")


def add_context_length(g, default: int | None, from_sae: bool = False) -> None:
    shown = "min(128, the model's)" if default is None else f"{default}, at most the model's"
    g.add_argument("--context-length", type=positive_int, default=default,
                   help=f"tokens per context; above the model's maximum, the maximum (with a note saying so) "
                        f"(default: {_from_sae(shown, from_sae)})")


def add_eval_contexts(g, default: int) -> None:
    g.add_argument("--eval-contexts", type=positive_int, default=default,
                   help=f"held-out contexts to evaluate on (default: {default})")


def add_train_contexts(g, default: int) -> None:
    g.add_argument("--train-contexts", type=positive_int, default=default,
                   help=f"training contexts (their activations are what the SAEs train on) (default: {default})")


def add_include_bos(g, from_sae: bool = False) -> None:
    g.add_argument("--include-bos", action="store_true",
                   help="keep the BOS position (position 0) in what is cached, scanned, trained on, "
                        f"averaged and spliced (default: {_from_sae('left out, as in evaluation', from_sae)})")


def outlier_multiple(text: str) -> float | None:
    """--outlier-multiple's value: a number > 1, or 0 / none to turn the rule off."""
    try:
        return OutlierRule.parse(text).multiple
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_outlier_multiple(g, default: float | None, what: str, from_sae: bool = False) -> None:
    """--outlier-multiple: rows whose norm is above X times the median row norm are outliers
    (saelab.data.outliers); `what` says what happens to them in this command."""
    g.add_argument("--outlier-multiple", type=outlier_multiple, default=default, metavar="X",
                   help=f"activation rows with norm above X times the median row norm are outliers: {what}; "
                        f"0 or none turns this off (default: {_from_sae(shown(default), from_sae)})")


def add_lm_batch_size(g, default: int) -> None:
    g.add_argument("--lm-batch-size", type=positive_int, default=default,
                   help=f"contexts per LM forward pass (default: {default})")


def add_cache_dtype(g, default: str = "float32") -> None:
    g.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=default,
                   help=f"dtype the activation cache stores (default: {default})")


def add_seed(p, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def add_out(p, default: str | None, required: bool = False, beside: str | None = None, file: bool = False) -> None:
    """--out, checked as it is parsed (out_path). `default` as the help shows it; `beside`: the
    default is the SAE argument's folder name plus "-<beside>", beside it (beside_sae); `file`:
    --out names a file, not a folder."""
    if beside is not None:
        default = f"<SAE>-{beside} beside the SAE; for an SAE in a run's saes/, in the run folder"
    p.add_argument("--out", type=out_file if file else out_path, default=None, required=required,
                   help="where the output goes; missing parent folders are created"
                        + ("" if required else f" (default: {default})"))
    p.set_defaults(out_default=default, out_beside=beside)


def output_folder(args: argparse.Namespace) -> Path:
    """--out, or the command's default (beside_sae for the SAE argument, where add_out says so),
    checked to be a folder saelab can create or write to (check_out)."""
    if args.out is not None:
        return Path(args.out)
    if getattr(args, "out_beside", None):
        return check_out(beside_sae(args.sae, args.out_beside), "the default output folder")
    return check_out(Path(args.out_default), "the default output folder")


def beside_sae(sae: str | Path, suffix: str) -> Path:
    """<SAE>-<suffix> beside the SAE folder; for an SAE in a run's saes/ folder, in the run
    folder instead (RUN/saes/NAME -> RUN/NAME-suffix), so saes/ holds only the run's SAEs."""
    folder = Path(sae)
    if not folder.name:  # "." or "/": name it by the folder it stands for
        folder = folder.resolve()
    parent = folder.parent.parent if folder.parent.name == "saes" else folder.parent
    return parent / f"{folder.name}-{suffix}"


def check_out(path: Path, what: str = "--out", file: bool = False) -> Path:
    """`path` if saelab can write there: it is a folder (a file, with `file`) or does not exist
    yet, and the nearest folder above it that exists can be written to (what is missing below
    it is created when the output is written); else a ConfigError saying why."""
    path, named = Path(path), f"{what} {path}".strip()
    if path.exists() and path.is_dir() == file:
        kind, want = ("a folder", "a file name") if file else ("a file", "a folder (new or existing)")
        raise ConfigError(f"{named} is {kind}; give {want}")
    above = path if path.exists() else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{named}: {above} is a file, so nothing can be created under it; give a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{named}: {above} is not writable (a read-only file system, or no permission); "
                          "give a folder you can write to")
    return path


def _checked_out(text: str, file: bool) -> Path:
    if not text.strip():  # Path("") is ".": an empty value is a slip, not the current folder
        raise argparse.ArgumentTypeError(f"is empty; give a {'file' if file else 'folder'} name")
    try:
        return check_out(Path(text), what="", file=file)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def out_path(text: str) -> Path:
    """--out's value for a folder (argparse `type=`): a bad one is a one-line usage error."""
    return _checked_out(text, file=False)


def out_file(text: str) -> Path:
    """--out's value for a file (argparse `type=`)."""
    return _checked_out(text, file=True)


def lm_and_eval_contexts(args: argparse.Namespace, sae=None) -> tuple[HookedLM, object]:
    """(HookedLM, held-out contexts) from the shared options: --model (else the SAE's own
    model) on --device at --dtype, and --eval-contexts of --source's held-out split."""
    lm = load_lm(args.model, sae, device=args.device, dtype=args.dtype)
    return lm, heldout_contexts(lm, args.source, args.eval_contexts, args.context_length)


def sae_and_lm(args: argparse.Namespace):
    """(SAE, HookedLM) of a command's SAE argument: the SAE in eval mode on the LM's device,
    checked to fit the LM (--model, else the SAE's own, on --device at --dtype)."""
    sae = SAE.load(args.sae).eval()
    check_features(sae, getattr(args, "feature", None))
    lm = load_lm(args.model, sae, device=args.device, dtype=args.dtype)
    check_sae_fits(lm, sae)
    return sae.to(lm.device), lm


def check_features(sae, features: int | list[int] | None) -> None:
    """A ConfigError, before any model loads, for a --feature index the SAE does not have."""
    wanted = [] if features is None else [features] if isinstance(features, int) else list(features)
    bad = [f for f in wanted if not 0 <= f < sae.cfg.d_sae]
    if bad:
        which = f"feature {bad[0]} is" if len(bad) == 1 else f"features {', '.join(map(str, bad))} are"
        raise ConfigError(f"{which} out of range: this SAE has features 0..{sae.cfg.d_sae - 1}")


# ---- toy data (saelab toy, saelab count --toy) ------------------------------------------------
def add_toy_data(g, default: ToyDataConfig, n_features: bool = True) -> None:
    """--d, --n-features (unless the command takes the count elsewhere), --mean-active and
    --uncorrelated: the toy generator's settings (saelab.data.toy)."""
    g.add_argument("--d", type=positive_int, default=default.d, help=f"activation dimension (default: {default.d})")
    if n_features:
        g.add_argument("--n-features", type=positive_int, default=default.n_features,
                       help=f"ground-truth features (> d: superposition) (default: {default.n_features})")
    g.add_argument("--mean-active", type=float, default=float(default.mean_active),
                   help=f"expected true features active per sample (default: {default.mean_active})")
    g.add_argument("--uncorrelated", action="store_true", help="features fire independently")


def toy_data(args: argparse.Namespace, n_features: int | None = None) -> ToyDataConfig:
    """The toy data the options above (and --batch-tokens, --seed) describe; `n_features`
    where the command takes the count elsewhere (saelab count --toy N)."""
    return ToyDataConfig(d=args.d, n_features=n_features or args.n_features, mean_active=args.mean_active,
                         correlated=not args.uncorrelated, batch_size=args.batch_tokens, seed=args.seed)


# ---- lists of tokens (logit lens, embedding space) -----------------------------------------
def add_drop_high_norm(g, default: float | None) -> None:
    g.add_argument("--drop-high-norm", type=float, default=default, metavar="Z",
                   help="leave out of token lists the tokens whose unembedding norm (embedding norm, for "
                        f"embedding-space lists) has a robust z-score above Z (default: {default})")


def add_feature_list_options(p: argparse.ArgumentParser) -> None:
    """--feature, --json and which tokens may be listed: `saelab logit-lens` and `saelab tokens`."""
    p.add_argument("--feature", type=int, nargs="+", required=True, help="feature index(es)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g = p.add_argument_group("tokens listed")
    add_drop_high_norm(g, None)
    g.add_argument("--drop-unused", default=None, metavar="SOURCE",
                   help="leave out tokens that never occur in this text (e.g. stdlib; first 4096 contexts)")


# ---- the feature report and its dashboard (saelab dashboard, saelab neurons) ----------------
def add_scan_contexts(g, shown: str) -> None:
    g.add_argument("--scan-contexts", type=positive_int, default=None,
                   help=f"held-out contexts to scan for examples (default: {shown})")


def add_feature_pages(p) -> None:
    """--features and --include-dead: which features get pages (every feature is in the index)."""
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="features to give pages (default: all); every feature is in the index")
    p.add_argument("--include-dead", action="store_true", help="also write pages for dead features")


def add_report_views(g, d: ReportOptions) -> None:
    """What each feature page shows (ReportOptions' view fields; read back by report_view_options)."""
    g.add_argument("--tree", action="store_true", help="also grow definition trees (slow: forwards per feature)")
    g.add_argument("--tree-vector", choices=TREE_VECTORS, default=d.tree_vector,
                   help="feature vector the ghost token is made of (both: two trees and their overlap)")
    g.add_argument("--tree-depth", type=int, default=d.tree_depth, help="levels of each definition tree")
    g.add_argument("--tree-breadth", type=int, default=d.tree_breadth,
                   help="children of each node of a definition tree")
    g.add_argument("--tree-scale", type=float, default=d.tree_scale, help="ghost vector norm in mean token norms")
    g.add_argument("--tree-unfiltered", action="store_true",
                   help="whole trees (default: without the continuations trees of random points share)")
    g.add_argument("--tree-generic-share", type=float, default=d.tree_generic_share,
                   help="a continuation in at least this share of random points' trees is generic")
    g.add_argument("--tree-background-samples", type=positive_int, default=d.tree_background_samples,
                   help="random points in embedding space whose trees make the background (built once per model)")
    g.add_argument("--ablate", type=int, default=d.n_ablate, help="top examples per feature with ablated text")
    g.add_argument("--ablate-quantile", type=int, default=d.n_ablate_quantile,
                   help="quantile examples per feature with ablated text")
    g.add_argument("--ablate-back", type=int, default=d.ablate_max_back,
                   help=f"earlier tokens removed in turn (0: all of them; default: {d.ablate_max_back})")
    g.add_argument("--embedding-scale", type=float, default=d.embedding_scale,
                   help="feature vector norm in mean token norms, for the nearest-token lists")
    g.add_argument("--embedding-exponent", type=float, default=d.embedding_exponent,
                   help="exponent on the cosine in the nearest-token score")
    g.add_argument("--coactive", type=int, default=d.n_coactive, metavar="N",
                   help="list the N features most correlated with each paged feature, counted during the scan "
                        "(0: skip the count; its cost grows with L0 squared)")
    add_drop_high_norm(g, d.high_norm_z)
    g.add_argument("--window", type=int, nargs=2, default=d.window, metavar=("BEFORE", "AFTER"),
                   help="keep only these many tokens around each example (default: whole contexts)")


def report_view_options(args: argparse.Namespace) -> dict:
    """ReportOptions fields from the view arguments (add_report_views), --include-bos and
    --outlier-multiple."""
    return dict(tree=args.tree, tree_vector=args.tree_vector, tree_depth=args.tree_depth,
                tree_breadth=args.tree_breadth, tree_scale=args.tree_scale, tree_filter=not args.tree_unfiltered,
                tree_generic_share=args.tree_generic_share, tree_background_samples=args.tree_background_samples,
                n_ablate=args.ablate,
                n_ablate_quantile=args.ablate_quantile, ablate_max_back=args.ablate_back or None,
                embedding_scale=args.embedding_scale, embedding_exponent=args.embedding_exponent,
                high_norm_z=args.drop_high_norm, window=tuple(args.window) if args.window else None,
                n_coactive=max(args.coactive, 0),
                exclude_bos=not args.include_bos, outliers=OutlierRule(args.outlier_multiple))


# ---- what a sweep trains --------------------------------------------------------------------
def k_archs() -> list[str]:
    return [name for name, cls in ACTIVATIONS.items() if cls.knob == "k"]


def add_arch(g, default, many: bool = True) -> None:
    penalty = [name for name in ACTIVATIONS if name not in k_archs()]
    g.add_argument("--arch", nargs="+" if many else None, choices=list(ACTIVATIONS), default=default,
                   metavar="ARCH",
                   help=f"SAE architecture{'s' if many else ''}: {', '.join(ACTIVATIONS)}; "
                        f"{', '.join(k_archs())} take --k, {', '.join(penalty)} take --coefficient "
                        f"(default: {shown(default)})")


class _Coefficients(argparse.Action):
    """--coefficient's values: one or more. Typed with none (as for a sweep of k architectures
    only), it says what to do instead, where argparse would only say a value is missing."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not values:
            raise argparse.ArgumentError(self, "give one or more coefficients; a sweep of k architectures only "
                                               f"({', '.join(k_archs())}) takes none: leave {option_string} out "
                                               "and name them with --arch, e.g. --arch topk --k 16 32")
        setattr(namespace, self.dest, values)


def add_coefficients(g, default, said: str | None = None) -> None:
    """`said`: the default in words, where it depends on other options (`default` is then None)."""
    g.add_argument("--coefficient", "--l1", dest="coefficient", type=float, nargs="*", action=_Coefficients,
                   default=default, metavar="C",
                   help="sparsity coefficients of architectures without k (relu's L1, jumprelu's L0, ...); several "
                        f"make a sweep; a sweep of k architectures only takes none: leave this out and give --arch "
                        f"(default: {said or shown(default)})")


def add_ks(g, default, said: str | None = None) -> None:
    """`said`: as add_coefficients'."""
    g.add_argument("--k", type=positive_int, nargs="+", default=default,
                   help=f"active features per token of k architectures ({', '.join(k_archs())}); several make "
                        f"a sweep (default: {said or shown(default)})")


def add_widths(g, expansion, d_sae, many: bool = True) -> None:
    nargs = "+" if many else None
    g.add_argument("--expansion", type=positive_float, nargs=nargs, default=expansion,
                   help=f"width{'s' if many else ''} as multiples of the input width d_in (default: {shown(expansion)})")
    g.add_argument("--d-sae", type=positive_int, nargs=nargs, default=d_sae,
                   help=f"width{'s' if many else ''} in features, instead of"
                        f"{' or beside' if many else ''} --expansion (default: {shown(d_sae)})")


def add_steps(g, default: int) -> None:
    g.add_argument("--steps", type=positive_int, default=default, help=f"training steps (default: {default})")


def add_batch_tokens(g, default: int | None, said: str | None = None) -> None:
    """`said`: as add_coefficients'."""
    g.add_argument("--batch-tokens", type=positive_int, default=default,
                   help=f"activation vectors (tokens) per training step of every SAE (default: {said or default})")


def spec_option_names() -> list[str]:
    """The TrainSpec fields that are per-SAE options: all but the grid's axes and `name`."""
    return [f.name for f in dataclasses.fields(TrainSpec) if f.name not in SPEC_AXES and f.name != "name"]


def add_spec_options(g, names=None, defaults: dict | None = None) -> None:
    """One option per TrainSpec field in `names` (default: every field but the grid's axes and
    `name`), typed from its annotation, with help from `field.metadata["help"]`. An option's
    default is `defaults[name]` if given, else it is absent unless typed (argparse.SUPPRESS),
    and the help shows the sweep's or TrainSpec's default."""
    hints = typing.get_type_hints(TrainSpec)
    fields = {f.name: f for f in dataclasses.fields(TrainSpec)}
    names = names or spec_option_names()
    defaults = defaults or {}
    for name in names:
        f = fields[name]
        default = defaults.get(name, argparse.SUPPRESS)
        shown = defaults.get(name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        if name in SWEEP_DEFAULTS_HELP and name not in defaults:
            shown = f"{SWEEP_DEFAULTS_HELP[name]} in a sweep; TrainSpec's: {f.default}"
        about = f.metadata.get("help") or f"TrainSpec.{name}"
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=default,
                       choices=f.metadata.get("choices"),
                       help=f"{about} (default: {shown})", **_argparse_type(hints[name]))


def _argparse_type(hint) -> dict:
    """type / nargs for a field's annotation: X | None reads as X; list[X] as several values;
    anything else as JSON text."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
    if hint is bool:  # `--compile` alone reads as true; `--compile false` is allowed too
        return {"type": _bool, "nargs": "?", "const": True, "metavar": "true|false"}
    if hint in (int, float, str):
        return {"type": hint}
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float, str):
        return {"type": typing.get_args(hint)[0], "nargs": "+"}
    return {"type": json.loads, "metavar": "JSON"}


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# ---- typed or not: for commands whose settings also come from a --config file ---------------
def defaults_apart(parser: argparse.ArgumentParser, keep=("out",)) -> None:
    """Options not typed stay off the namespace (argparse.SUPPRESS), their defaults kept in
    `args.option_defaults`: `given(args)` is then what was typed, for a --config file to sit
    between the two. `keep`: dests that stay ordinary."""
    defaults, dests = {}, set()
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.dest not in keep:
            dests.add(action.dest)
            if action.default is not argparse.SUPPRESS:
                defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
    parser.set_defaults(option_defaults=defaults, option_dests=dests)


def given(args: argparse.Namespace) -> dict:
    """The options typed on the command line (of those `defaults_apart` set apart)."""
    return {k: v for k, v in vars(args).items() if k in args.option_dests}


def filled(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the defaults of the options not typed filled back in."""
    return argparse.Namespace(**{**args.option_defaults, **vars(args)})


# ---- what an SAE records about its training text ---------------------------------------------
def recorded(sae) -> dict:
    """The option values an SAE's provenance records (saelab.data.provenance), by option dest:
    source, context_length, include_bos, outlier_multiple; those it does not record (or no SAE)
    are absent."""
    if sae is None:
        return {}
    prov = Provenance.of(sae)
    out = {"source": prov.source, "context_length": prov.context_length,
           "include_bos": None if prov.exclude_bos is None else not prov.exclude_bos}
    out = {k: v for k, v in out.items() if v is not None}
    if prov.outliers is not None:
        out["outlier_multiple"] = prov.outliers.multiple
    return out


def for_sae(args: argparse.Namespace, sae) -> argparse.Namespace:
    """`args` (of a command whose defaults `defaults_apart` set apart) for one SAE: each option
    as typed, else as the SAE records it (`recorded`), else the command's default. The one
    place commands that run an SAE on text take its training text's settings."""
    from_sae = {k: v for k, v in recorded(sae).items() if k in args.option_dests}
    return argparse.Namespace(**{**args.option_defaults, **from_sae, **vars(args)})
