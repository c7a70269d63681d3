"""The `saelab` command line: shared options, `saelab train`'s options from TrainSpec and its
--config file, one-line errors for bad input, and the commands' independence from each other."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from saelab import cli
from saelab.commands import options, sweep_options
from saelab.errors import ConfigError
from saelab.pipelines import train_lm
from saelab.sae import SAE
from saelab.sae.activations import TopK
from saelab.sae.architectures import ACTIVATIONS
from saelab.train.spec import TrainSpec

COMMANDS_DIR = Path(cli.__file__).parent / "commands"


def _subparsers(parser=None) -> dict:
    parser = parser or cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def _config(argv) -> "sweep_options.LMSweepConfig":
    return sweep_options.config_from_args(cli.build_parser().parse_args(argv))


def _spec_rows(cfg) -> list[tuple]:
    return [(s.label(64), s.arch, s.expansion, s.coefficient, s.k, s.lr, s.warmup_steps, s.coefficient_warmup_steps,
             s.dead_tokens, s.decoder_norm) for s in cfg.specs]


# ---- help -----------------------------------------------------------------------------------
def test_every_command_says_what_it_does_and_writes():
    for name, parser in _subparsers().items():
        text = parser.format_help()
        assert "SUPPRESS" not in text and "%(" not in text, name
        assert "writes" in parser.description.lower() or "prints" in parser.description.lower(), name


def test_train_help_groups_options_and_states_precedence():
    text = _subparsers()["train"].format_help()
    for group in ("language model:", "the sweep's grid", "per-SAE settings", "run:"):
        assert group in text
    assert "lowest precedence first" in text and "--print-config" in text


# ---- the sweep of train and quickstart -------------------------------------------------------
def test_quickstart_and_train_defaults_are_the_sweeps_they_always_were():
    """Specs, order and labels as before the options were generated (quickstart's results depend
    on them): relu at each L1 with the coefficient warmed up over steps // 10, topk at each k
    with dead_tokens 200k, lr 1e-3 and warmup steps // 20 for both, at each width."""
    relu = lambda e, c, steps: (f"relu_{64 * e}_c{c:g}", "relu", e, c, None, 1e-3, steps // 20, steps // 10, 1_000_000, "weighted")
    topk = lambda e, k, steps: (f"topk_{64 * e}_k{k}", "topk", e, 0.0, k, 1e-3, steps // 20, 0, 200_000, "weighted")
    quick = _config(["quickstart"])
    assert _spec_rows(quick) == [row for e in (4, 8) for row in
                                 [relu(e, 2.0, 400), relu(e, 5.0, 400), topk(e, 16, 400), topk(e, 32, 400)]]
    assert (quick.steps, quick.train_contexts, quick.eval_contexts, quick.batch_size, quick.context_length) == \
        (400, 4096, 64, 4096, 128)
    train = _config(["train"])
    assert _spec_rows(train) == [relu(8, c, 1000) for c in (1.0, 2.0, 4.0)] + [topk(8, k, 1000) for k in (16, 32)]
    assert (train.steps, train.train_contexts, train.device, train.lm_dtype) == (1000, 8192, "cpu", "float32")


def test_typed_settings_override_the_sweep_heuristics_where_they_apply():
    cfg = _config(["train", "--arch", "relu", "jumprelu", "batchtopk", "--coefficient", "0.5", "--k", "8",
                   "--d-sae", "96", "--lr", "3e-4", "--warmup-steps", "7", "--aux-k", "12", "--init", "data",
                   "--b-dec-init", "geometric_median", "--resample-every", "50", "--decoder-norm", "unit",
                   "--coefficient-warmup-steps", "3", "--steps", "200", "--batch-tokens", "512"])
    assert [s.label(64) for s in cfg.specs] == ["relu_96_c0.5", "jumprelu_96_c0.5", "batchtopk_96_k8"]
    relu, jump, btk = cfg.specs
    assert all(s.expansion is None and s.d_sae == 96 and s.lr == 3e-4 and s.warmup_steps == 7 for s in cfg.specs)
    assert all(s.init == "data" and s.b_dec_init == "geometric_median" for s in cfg.specs)
    assert [s.resample_every for s in cfg.specs] == [50, 0, 0]  # resampling: relu only (its class says)
    assert [s.decoder_norm for s in cfg.specs] == ["unit", "weighted", "weighted"]  # relu and gated read it
    assert relu.aux_k is None and jump.aux_k is None and btk.aux_k == 12  # aux_k: aux-k architectures only
    assert relu.coefficient_warmup_steps == 3 and btk.coefficient_warmup_steps == 0
    assert btk.dead_tokens == 200_000 and relu.dead_tokens == TrainSpec().dead_tokens
    assert (cfg.steps, cfg.batch_size) == (200, 512)


def test_architectures_come_from_the_registry(monkeypatch):
    """A newly registered architecture is a valid --arch, swept over k if its class uses_k."""
    monkeypatch.setitem(ACTIVATIONS, "newk", TopK)
    cfg = _config(["train", "--arch", "newk", "--k", "4"])
    assert [(s.arch, s.k, s.dead_tokens) for s in cfg.specs] == [("newk", 4, 200_000)]
    assert "newk" in options.k_archs()


def test_every_trainspec_field_is_an_option():
    parser = _subparsers()["train"]
    dests = {a.dest for a in parser._actions}
    # init is --init (dest inits): one value sets every SAE's init, several train each SAE per init
    assert ({f.name for f in dataclasses.fields(TrainSpec)} - {"name", "init"}) | {"inits"} <= dests


def test_config_file_precedence(tmp_path):
    path = tmp_path / "run.json"
    spec = {"arch": "jumprelu", "coefficient": 0.01, "expansion": 2, "init": "data"}
    path.write_text(json.dumps({"steps": 300, "train_contexts": 128, "device": "cpu",
                                "specs": [spec, {"arch": "topk", "k": 4, "d_sae": 40}]}))
    cfg = _config(["train", "--config", str(path)])
    assert cfg.specs == [TrainSpec(**spec), TrainSpec(arch="topk", k=4, d_sae=40)]  # exactly, no heuristics
    assert (cfg.steps, cfg.train_contexts, cfg.eval_contexts) == (300, 128, 64)  # file over defaults
    cfg = _config(["train", "--config", str(path), "--steps", "1000", "--lr", "0.01", "--aux-k", "9"])
    assert cfg.steps == 1000  # typed over the file, even when equal to the default
    assert [s.lr for s in cfg.specs] == [0.01, 0.01] and [s.aux_k for s in cfg.specs] == [None, 9]
    cfg = _config(["train", "--config", str(path), "--arch", "topk", "--k", "3"])  # a typed grid replaces specs
    assert [s.label(64) for s in cfg.specs] == ["topk_512_k3"] and cfg.specs[0].warmup_steps == 300 // 20
    # --print-config writes a file that gives the same run back
    printed = tmp_path / "printed.json"
    printed.write_text(json.dumps(_config(["quickstart", "--lr", "2e-3"]).to_dict()))
    again = _config(["train", "--config", str(printed)])
    assert again == _config(["quickstart", "--lr", "2e-3"])


def test_print_config_prints_and_trains_nothing(capsys, monkeypatch):
    monkeypatch.setattr(train_lm, "load_lm", _refuse)
    assert cli.main(["quickstart", "--arch", "batchtopk", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["arch"] for s in printed["specs"]] == ["batchtopk"] * 4 and printed["steps"] == 400


@pytest.mark.slow
def test_train_runs_what_only_the_generated_options_and_a_config_file_reach(tiny_lm_path, tmp_path):
    """jumprelu, data-sample init, geometric-median b_dec, aux-k, an LM in bfloat16: one command."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "model": str(tiny_lm_path), "context_length": 16, "train_contexts": 48, "eval_contexts": 4,
        "batch_size": 128, "steps": 12,
        "specs": [{"arch": "jumprelu", "coefficient": 0.01, "d_sae": 48, "init": "data", "b_dec_init": "geometric_median"},
                  {"arch": "batchtopk", "k": 4, "d_sae": 48, "aux_k": 8}]}))
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--out", str(run), "--lr", "3e-3", "--dtype", "bfloat16"]) == 0
    jump, btk = (SAE.load(run / "saes" / name) for name in ("jumprelu_48_c0.01", "batchtopk_48_k4"))
    assert (jump.cfg.arch, btk.cfg.arch, btk.cfg.k) == ("jumprelu", "batchtopk", 4)
    trained = [sae.cfg.metadata["train"] for sae in (jump, btk)]
    assert [t["lr"] for t in trained] == [3e-3, 3e-3] and [t["aux_k"] for t in trained] == [None, 8]
    assert (trained[0]["init"], trained[0]["b_dec_init"]) == ("data", "geometric_median")


# ---- bad input: one line, exit code 2, no traceback -------------------------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("a bad input reached the model")


BAD = [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--arch", "gated2"], "invalid choice: 'gated2' (choose from 'relu', 'topk'"),
    (["train", "--arch", "relu", "--k", "16"], "k applies only to architectures topk, batchtopk"),
    (["train", "--arch", "topk", "--l1", "2"], "coefficient applies only to architectures relu"),
    (["train", "--arch", "relu", "jumprelu", "--aux-k", "8"], "aux_k applies only to"),
    (["train", "--arch", "topk", "--coefficient-warmup-steps", "8"], "coefficient_warmup_steps applies only to"),
    (["quickstart", "--device", "gpu"], "unknown device 'gpu'; valid: cpu, cuda, cuda:N, mps"),
    (["train", "--device", "cuda:99"], "device 'cuda:99'"),
    (["train", "--init", "random"], "argument --init: invalid choice: 'random' (choose from 'tied', 'data')"),
    (["train", "--b-dec-init", "median"], "argument --b-dec-init: invalid choice: 'median'"),
    (["train", "--decoder-norm", "l2"], "invalid choice: 'l2'"),
    (["train", "--k", "0"], "must be a positive integer"),
    (["train", "--expansion", "x"], "argument --expansion: must be a positive number, got 'x'"),
    (["train", "--arch", "topk", "--k"], "argument --k: expected at least one argument"),
    (["train", "--config", "no/such.json"], "--config no/such.json: no such file"),
    (["train", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["sparse-mlp", "--arch", "relu", "--k", "4"], "k applies only to"),
    (["sparse-mlp", "--arch", "mystery"], "invalid choice: 'mystery'"),
    (["sparse-mlp", "--d-sae", "64", "--expansion", "4"], "--d-sae or as --expansion, not both"),
    (["toy", "--arch", "relu2"], "invalid choice: 'relu2' (choose from 'relu', 'topk'"),
    (["dashboard", "x", "--device", "cuda:banana"], "unknown device 'cuda:banana'"),
    (["dashboard", "x", "--contexts", "5"], "unrecognized arguments: --contexts 5"),
    (["cache", "--hooks", "h", "--out", "o", "--keep-bos"], "unrecognized arguments: --keep-bos"),
    (["cache", "--hooks", "h"], "the following arguments are required: --out"),
    (["perturb", "sae", "--device", "tpu"], "unknown device 'tpu'"),
    (["prune", "sae", "--target-l0", "x"], "invalid float value: 'x'"),
    (["logit-lens", "sae", "--feature", "1", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["tokens", "sae"], "the following arguments are required: --feature"),
    (["compare"], "the following arguments are required: RUN_OR_SAE"),
    (["train", "--config", "{bad}"], "is not valid JSON"),
    (["train", "--config", "{unknown}"], "unknown key(s) ['stepz']; valid: ['specs', 'model'"),
    (["train", "--config", "{badspec}"], "unknown TrainSpec field(s) ['kk']"),
    (["train", "--config", "{wrongtype}"], "specs[0]: lr must be number, got '0.1'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys, monkeypatch):
    files = {"{bad}": "{steps: 3", "{unknown}": '{"stepz": 3}', "{badspec}": '{"specs": [{"arch": "topk", "kk": 3}]}',
             "{wrongtype}": '{"specs": [{"arch": "relu", "lr": "0.1"}]}'}
    for key, text in files.items():
        (tmp_path / key.strip("{}")).write_text(text)
    argv = [str(tmp_path / a.strip("{}")) if a in files else a for a in argv]
    for module in (train_lm, options, *cli.COMMANDS):
        if hasattr(module, "load_lm"):
            monkeypatch.setattr(module, "load_lm", _refuse)
    try:
        code = cli.main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


def test_check_device():
    assert options.check_device("cpu") == "cpu"
    for bad in ("", "gpu", "cuda:x", "meta"):
        with pytest.raises(ConfigError):
            options.check_device(bad)


# ---- every LM command honours --device and --dtype ---------------------------------------------
class _Loaded(Exception):
    pass


@pytest.mark.parametrize("argv", [
    ["train"], ["quickstart"], ["cache", "--hooks", "blocks.0.hook_resid_post", "--out", "{tmp}/c"],
    ["dashboard", "{sae}"], ["neurons", "--layer", "0"], ["perturb", "{sae}"], ["perturb", "--hooks", "layers"], ["prune", "{sae}", "--target-l0", "2"], ["sparse-mlp"],
    ["logit-lens", "{sae}", "--feature", "1"], ["tokens", "{sae}", "--feature", "1"],
], ids=lambda argv: argv[0])
def test_lm_commands_pass_device_and_dtype_to_load_lm(argv, tmp_path, monkeypatch):
    SAE(32, 16, hook_name="blocks.0.hook_resid_post").save(tmp_path / "sae")
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        raise _Loaded

    for module in (train_lm, options, *cli.COMMANDS):
        if hasattr(module, "load_lm"):
            monkeypatch.setattr(module, "load_lm", load)
    argv = [a.format(tmp=tmp_path, sae=tmp_path / "sae") for a in argv]
    with pytest.raises(_Loaded):
        cli.main(argv + ["--device", "cpu:0", "--dtype", "bfloat16"])  # neither is a default
    assert calls == [{"device": "cpu:0", "dtype": "bfloat16"}]


# ---- structure --------------------------------------------------------------------------------
def test_no_command_imports_another_and_cli_imports_them_explicitly():
    commands = {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
    assert commands == {p.stem for p in COMMANDS_DIR.glob("*.py")} - {"__init__", "options", "sweep_options"}
    for path in COMMANDS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            imported = {n.rsplit(".", 1)[1] for n in names if n.startswith("saelab.commands.")}
            assert not imported & commands, f"{path.name} imports command(s) {imported & commands}"
    assert "importlib" not in (COMMANDS_DIR.parent / "cli.py").read_text()


def test_building_the_parser_imports_no_plotting_and_loads_no_model():
    """`saelab --help` stays quick: no matplotlib, and no transformers (no LM is loaded)."""
    code = ("import sys\nfrom saelab.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_a_single_text_file_is_a_source_for_train_and_dashboard(tiny_lm_path, tmp_path, capsys):
    """--source notes.txt: one document, cut into pieces so the held-out split that train
    evaluates on and dashboard scans is not empty (it was: "heldout split ... is empty")."""
    import inspect
    import textwrap

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(inspect.getdoc(m) for m in (json, textwrap, inspect, pytest)) * 3)
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_lm_path), "--source", str(notes), "--context-length", "16",
            "--train-contexts", "48", "--eval-contexts", "4", "--steps", "6", "--arch", "topk", "--k", "4",
            "--d-sae", "32", "--out", str(run)]
    assert cli.main(argv) == 0
    assert "notes.txt is one document; it is cut at paragraph breaks" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())
    sae = run / "saes" / "topk_32_k4"
    assert SAE.load(sae).cfg.metadata["provenance"]["source"] == str(notes)
    assert cli.main(["dashboard", str(sae), "--scan-contexts", "8", "--out", str(tmp_path / "dash")]) == 0
    assert (tmp_path / "dash" / "index.html").exists()
