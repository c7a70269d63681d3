"""The options of an SAE sweep on a language model, shared by `saelab train` and `saelab
quickstart` (each with its own defaults), and how they become an LMSweepConfig.

Every TrainSpec field is an option (generated from the dataclass, so a new field is one too),
and `--config FILE` gives a whole run as JSON. Precedence, lowest first: the defaults, the
file, the options typed on the command line (`options.defaults_apart` tells typed from not).
Not a command: cli.py does not list it, and it imports no command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from saelab.commands import options
from saelab.errors import ConfigError, MissingFileError
from saelab.pipelines.train_lm import LMSweepConfig, run_lm_sweep, table_columns
from saelab.tables import format_rows
from saelab.train.spec import INITS, TrainSpec
from saelab.train.sweep import SweepGrid, applies, check_applies, sweep_specs

# option dest -> LMSweepConfig field, where the shared option's name says more than the field's
RENAMES = {"batch_tokens": "batch_size", "dtype": "lm_dtype"}

PRECEDENCE = """\
Settings, lowest precedence first: the defaults shown; --config FILE; the options typed on the
command line. FILE is JSON with LMSweepConfig's keys, all optional, e.g.

  {"steps": 2000, "train_contexts": 16384,
   "specs": [{"arch": "jumprelu", "coefficient": 0.01, "expansion": 16},
             {"arch": "topk", "k": 32, "expansion": 16, "init": "data", "aux_k": 256}]}

"specs" (TrainSpec fields) are trained exactly as given; without it the grid of --arch,
--coefficient, --k and --expansion / --d-sae is. Grid options typed on the command line replace
the file's specs with their grid; the other per-SAE options typed (--lr, --init, ...) are set
on every spec they apply to. --print-config prints the resulting file and exits."""


def add_sweep_options(p: argparse.ArgumentParser, *, out: str, grid: SweepGrid, **pipeline) -> None:
    """Every option of a sweep; `out` (the run folder), `grid` and `pipeline` (LMSweepConfig
    fields) are this command's defaults, the latter over LMSweepConfig's own."""
    d = {**_pipeline_defaults(), **pipeline}
    options.add_model_options(p)
    g = p.add_argument_group("where and what to train on")
    options.add_hook(g, d["hook"])
    g.add_argument("--hook-out", default=d["hook_out"],
                   help="target hook of a transcoder / sparse MLP, e.g. blocks.0.hook_mlp_out (default: none)")
    options.add_source(g, d["source"])
    options.add_context_length(g, d["context_length"])
    options.add_train_contexts(g, d["train_contexts"])
    options.add_eval_contexts(g, d["eval_contexts"])
    options.add_cache_dtype(g, d["cache_dtype"])
    options.add_outlier_multiple(g, d["outlier_multiple"], "dropped from training, left out of the metrics (and "
                                 "reported beside them) and kept clean in the splice")
    g.add_argument("--live", action="store_true",
                   help="no activation cache on disk: batches come straight from the LM through a mixing buffer "
                        "(the same batches as from a cache; the LM runs again on a resumed run)")
    g = p.add_argument_group("the sweep's grid (SAEs trained together, in one pass)")
    options.add_arch(g, grid.arch)
    options.add_widths(g, grid.expansion, grid.d_sae)
    options.add_coefficients(g, grid.coefficient)
    options.add_ks(g, grid.k)
    g = p.add_argument_group("training (every SAE)")
    options.add_steps(g, d["steps"])
    options.add_batch_tokens(g, d["batch_size"])
    g.add_argument("--no-normalize-activations", dest="normalize_activations", action="store_false",
                   default=d["normalize_activations"],
                   help="train on raw activations (default: scaled to mean norm sqrt(d_in), folded back on save)")
    options.add_seed(g, d["seed"])
    options.add_spec_options(p.add_argument_group(
        "per-SAE settings (TrainSpec fields; each applies to every SAE of the sweep it means something for)"),
        [name for name in options.spec_option_names() if name != "init"])
    _add_init_options(p.add_argument_group("initialisation and recovery during training (seed 001)"), d)
    g = p.add_argument_group("run")
    options.add_out(g, out)
    g.add_argument("--config", type=Path, metavar="FILE", help="JSON file of the run's settings (see below)")
    g.add_argument("--print-config", action="store_true", help="print the settings as a --config file and exit")
    g.add_argument("--parallel", choices=("sweep", "data"), default=d["parallel"],
                   help="under torchrun: each rank trains whole SAEs of the sweep (sweep), or every SAE on its "
                        "share of each batch, gradients all-reduced (data); see docs/distributed.md")
    options.defaults_apart(p)
    p.set_defaults(sweep_grid=grid)


def _add_init_options(g, d: dict) -> None:
    g.add_argument("--init", dest="inits", nargs="+", choices=INITS, default=d["inits"],
                   help="decoder inits: 'tied' (random rows, W_enc = W_dec^T), 'data' (rows are samples of the "
                        "first batch); more than 'tied' trains every SAE once per init, labelled <label>_<init> "
                        f"(default: {' '.join(d['inits'])})")
    g.add_argument("--reference", metavar="SAE", default=d["reference"],
                   help="an SAE folder at the same hook (e.g. a long run's): each SAE's MMCS against its decoder "
                        "is recorded during training, recovery_curve.json and .png; train it with another --seed, or its "
                        "tied init is this run's (default: none)")
    g.add_argument("--curve-every", type=options.non_negative_int, default=None, metavar="N",
                   help="steps between those MMCS measurements, from the initial SAEs (default: steps // 20 "
                        "with --reference, else off)")


def config_from_args(args: argparse.Namespace) -> LMSweepConfig:
    """The run's LMSweepConfig: defaults < --config file < options typed."""
    typed = options.given(args)
    if len(typed.get("inits", [])) == 1:  # one init is a per-SAE setting; several train each SAE per init
        typed["init"] = typed.pop("inits")[0]
    file = read_config_file(typed["config"]) if "config" in typed else {}
    pipeline = _pipeline_settings(args.option_defaults, file, typed)
    if pipeline.get("curve_every") is None:
        pipeline["curve_every"] = max(1, pipeline["steps"] // 20) if pipeline.get("reference") else 0
    return LMSweepConfig(specs=_specs(args.sweep_grid, file.get("specs"), typed, pipeline["steps"]), **pipeline)


def _pipeline_settings(defaults: dict, file: dict, typed: dict) -> dict:
    """LMSweepConfig's fields but specs, each from the highest of the three that has it."""
    names = {f.name for f in dataclasses.fields(LMSweepConfig)} - {"specs"}
    pick = lambda source: {RENAMES.get(k, k): v for k, v in source.items() if RENAMES.get(k, k) in names}
    out = {**pick(defaults), **{k: v for k, v in file.items() if k != "specs"}, **pick(typed)}
    options.check_device(out["device"])
    if out["lm_dtype"] not in options.LM_DTYPES:
        raise ConfigError(f"lm_dtype must be one of {options.LM_DTYPES}, got {out['lm_dtype']!r}")
    return out


def _specs(grid: SweepGrid, file_specs: list[TrainSpec] | None, typed: dict, steps: int) -> list[TrainSpec]:
    """The file's specs, unless grid options were typed or it has none: then the grid's; with
    the per-SAE settings typed set on every spec they apply to."""
    names = {f.name for f in dataclasses.fields(TrainSpec)} - set(options.SPEC_AXES) - {"name"}
    fields = {k: v for k, v in typed.items() if k in names}
    axes = {k: v for k, v in typed.items() if k in options.SPEC_AXES}
    if file_specs and not axes:
        check_applies(fields, [spec.arch for spec in file_specs])
        return [dataclasses.replace(spec, **{k: v for k, v in fields.items() if applies(k, spec.arch)})
                for spec in file_specs]
    if "d_sae" in axes and "expansion" not in axes:
        axes["expansion"] = []  # --d-sae alone: those widths, not the default expansions too
    grid = dataclasses.replace(grid, **axes)
    check_applies([name for name in ("coefficient", "k") if name in axes], grid.arch)
    return sweep_specs(grid, steps, **fields)


def read_config_file(path: Path) -> dict:
    """A --config file's settings (LMSweepConfig keys; "specs" as TrainSpecs), checked."""
    if not Path(path).is_file():
        raise MissingFileError(f"--config {path}: no such file")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path} is not valid JSON: {err}") from None
    known = [f.name for f in dataclasses.fields(LMSweepConfig)]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a JSON object with keys among {known}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid: {known}")
    _check_types(LMSweepConfig, {k: v for k, v in data.items() if k != "specs"}, f"--config {path}")
    if "specs" in data:
        specs = data["specs"]
        if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
            raise ConfigError(f"--config {path}: specs must be a non-empty list of TrainSpec objects")
        for i, spec in enumerate(specs):
            _check_types(TrainSpec, spec, f"--config {path}: specs[{i}]")
        data["specs"] = [TrainSpec.from_dict(s) for s in specs]
    return data


def _check_types(cls, data: dict, where: str) -> None:
    """A ConfigError for a value whose JSON type does not fit its field's annotation (unknown
    keys are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        allowed = _json_types(hints[key]) if key in hints else None
        if allowed and (not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed):
            names = sorted({"null" if t is type(None) else "number" if float in allowed and t in (int, float)
                            else t.__name__ for t in allowed})
            raise ConfigError(f"{where}: {key} must be {' or '.join(names)}, got {value!r}")


def _json_types(hint) -> tuple | None:
    """The JSON value types an annotation takes (float takes ints too); None: not checked."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    out = ()
    for arg in typing.get_args(hint) if union else (hint,):
        if arg is type(None) or arg in (int, str, bool):
            out += (arg,)
        elif arg is float:
            out += (int, float)
        elif typing.get_origin(arg) is list:
            out += (list,)
        else:
            return None
    return out


def print_config(cfg: LMSweepConfig) -> None:
    print(json.dumps(cfg.to_dict(), indent=1))


def run_sweep(args: argparse.Namespace):
    """What `train` and `quickstart` run: the sweep their options give, into --out, its table
    printed; returns (rows, run folder), or None after --print-config (nothing trained)."""
    cfg = config_from_args(args)
    if options.given(args).get("print_config"):
        print_config(cfg)
        return None
    out = options.output_folder(args)
    rows = run_lm_sweep(cfg, out)
    print(format_rows(rows, table_columns(rows)))
    return rows, out


def _pipeline_defaults() -> dict:
    fields = [f for f in dataclasses.fields(LMSweepConfig) if f.name != "specs"]
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in fields}
