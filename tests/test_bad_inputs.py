"""Every command on a table of bad inputs: one line on stderr naming the problem, exit code 2,
never a traceback, and no model loaded (each is refused before any work starts). Beside the
table: --out on a read-only folder, an OSError while writing, Ctrl-C (one line saying where the
last checkpoint is; rerunning resumes bit for bit), --context-length above the model's maximum,
and where prune / perturb / steer write by default."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from saelab import cli
from saelab.commands import options
from saelab.errors import Interrupted
from saelab.pipelines import train_lm
from saelab.sae import SAE
from saelab.train import trainer as trainer_module

NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"  # a device not here


def _refuse(*args, **kwargs):
    raise AssertionError("a bad input reached the model")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """{name: path} the rows' placeholders stand for: a tiny SAE (d_in 32, 16 features), a
    file, a folder, a missing SAE, and --config files with zero counts."""
    root = tmp_path_factory.mktemp("bad")
    SAE(32, 16, hook_name="blocks.0.hook_resid_post").save(root / "sae")
    SAE(32, 16, hook_name="blocks.1.hook_resid_post").save(root / "sae1")
    (root / "file").write_text("not a folder")
    (root / "folder").mkdir()
    for key in ("eval_contexts", "train_contexts", "steps"):
        (root / f"zero_{key}.json").write_text(json.dumps({key: 0}))
    (root / "length1.json").write_text(json.dumps({"context_length": 1}))
    names = {"sae": "sae", "sae1": "sae1", "file": "file", "folder": "folder", "nosae": "no-such-sae", "length1": "length1.json",
             **{f"zero_{k}": f"zero_{k}.json" for k in ("eval_contexts", "train_contexts", "steps")}}
    return {key: root / name for key, name in names.items()}


# (argv, what the one line must say); {name} stands for places[name]
BAD = [
    # --out: a file, under a file
    (["train", "--out", "{file}"], "argument --out: {file} is a file; give a folder"),
    (["quickstart", "--out", "{file}/run"], "{file} is a file, so nothing can be created under it"),
    (["toy", "--out", "{file}"], "is a file; give a folder"),
    (["count", "--out", "{file}"], "is a file; give a folder"),
    (["frontier", "--out", "{file}/x/y"], "is a file, so nothing can be created under it"),
    (["sparse-mlp", "--out", "{file}"], "is a file; give a folder"),
    (["cache", "--hooks", "blocks.0.hook_resid_post", "--out", "{file}"], "is a file; give a folder"),
    (["dashboard", "{sae}", "--out", "{file}"], "is a file; give a folder"),
    (["neurons", "--layer", "0", "--out", "{file}"], "is a file; give a folder"),
    (["prune", "{sae}", "--target-l0", "4", "--out", "{file}"], "is a file; give a folder"),
    (["perturb", "{sae}", "--out", "{file}"], "is a file; give a folder"),
    (["steer", "{sae}", "--feature", "1", "--scale", "1", "--prompt", "hi", "--out", "{file}"], "is a file"),
    (["compare", "{sae}", "--out", "{folder}"], "{folder} is a folder; give a file name"),
    (["train", "--out", ""], "argument --out: is empty; give a folder name"),
    (["compare", "{sae}", "--out", " "], "argument --out: is empty; give a file name"),
    (["compare", "{sae}", "--out", "{file}/compare.json"], "is a file, so nothing can be created under it"),
    # --device: not on this machine, or not a device
    (["train", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["quickstart", "--device", "tpu"], "unknown device 'tpu'; valid: cpu, cuda, cuda:N, mps"),
    (["count", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["frontier", "--device", "gpu"], "unknown device 'gpu'"),
    (["sparse-mlp", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["cache", "--hooks", "h", "--out", "{folder}/c", "--device", "npu"], "unknown device 'npu'"),
    (["dashboard", "{sae}", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["neurons", "--layer", "0", "--device", "xla:9"], "device 'xla:9'"),
    (["perturb", "{sae}", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["prune", "{sae}", "--target-l0", "4", "--device", "tpu"], "unknown device 'tpu'"),
    (["steer", "{sae}", "--feature", "1", "--scale", "1", "--prompt", "hi", "--device", NO_CUDA], "device"),
    (["logit-lens", "{sae}", "--feature", "1", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["tokens", "{sae}", "--feature", "1", "--device", "quantum"], "unknown device 'quantum'"),
    # counts: zero or not a number is refused as such, never as "corpus too small"
    (["train", "--eval-contexts", "0"], "argument --eval-contexts: must be a positive integer, got 0"),
    (["train", "--train-contexts", "many"], "argument --train-contexts: must be a positive integer, got 'many'"),
    (["train", "--config", "{zero_eval_contexts}"], "eval_contexts must be a positive integer, got 0"),
    (["train", "--config", "{zero_train_contexts}"], "train_contexts must be a positive integer, got 0"),
    (["quickstart", "--config", "{zero_steps}"], "steps must be a positive integer, got 0"),
    (["train", "--config", "{length1}"], "context_length must be at least 2"),
    (["quickstart", "--steps", "0"], "must be a positive integer, got 0"),
    (["train", "--expansion", "0"], "argument --expansion: must be a positive number, got 0"),
    (["sparse-mlp", "--expansion", "-4"], "argument --expansion: must be a positive number, got -4"),
    (["toy", "--d", "0"], "argument --d: must be a positive integer"),
    (["count", "--toy", "0"], "argument --toy: must be a positive integer"),
    (["count", "--eval-contexts", "0"], "must be a positive integer"),
    (["frontier", "--train-contexts", "0"], "must be a positive integer"),
    (["sparse-mlp", "--eval-contexts", "0"], "must be a positive integer"),
    (["cache", "--hooks", "h", "--out", "{folder}/c", "--cache-contexts", "0"], "must be a positive integer"),
    (["dashboard", "{sae}", "--scan-contexts", "0"], "must be a positive integer"),
    (["neurons", "--layer", "0", "--scan-contexts", "-3"], "must be a positive integer"),
    (["perturb", "{sae}", "--eval-contexts", "0"], "must be a positive integer"),
    (["prune", "{sae}", "--target-l0", "4", "--eval-contexts", "0"], "must be a positive integer"),
    (["prune", "{sae}", "--target-l0", "4", "--context-length", "0"], "must be a positive integer"),
    (["steer", "{sae}", "--feature", "1", "--scale", "1", "--prompt", "hi", "--max-new-tokens", "0"],
     "must be a positive integer"),
    # --coefficient / --l1 with no values: what to do instead
    (["train", "--arch", "topk", "--l1"], "leave --l1 out and name them with --arch"),
    (["toy", "--arch", "topk", "--coefficient"], "leave --coefficient out and name them with --arch"),
    (["sparse-mlp", "--l1"], "give one or more coefficients"),
    (["count", "--l1"], "give one or more coefficients"),
    # values an experiment refuses, refused before a model loads
    (["prune", "{sae}", "--target-l0", "0"], "give one or more positive target L0 values"),
    (["perturb", "{sae}", "--cos", "1.5"], "cosine targets must lie in [-1, 1]"),
    (["perturb"], "nothing to perturb"),
    (["steer", "{sae}", "--feature", "16", "--scale", "1", "--prompt", "hi"],
     "feature 16 is out of range: this SAE has features 0..15"),
    (["logit-lens", "{sae}", "--feature", "3", "-1", "16"], "features -1, 16 are out of range"),
    (["tokens", "{sae}", "--feature", "99"], "feature 99 is out of range"),
    (["frontier", "{sae}", "--base-coefficient", "3"], "--base-coefficient: these set the base trained here"),
    (["toy", "--curve-every", "-1"], "--curve-every must be >= 0"),
    (["toy", "--mean-active", "-1", "--out", "{folder}/toy"], "mean_active must be in"),
    (["compare", "{sae}", "--threshold", "2"], "threshold is a cosine in [-1, 1]"),
    # missing things
    (["prune", "{nosae}", "--target-l0", "4"], "does not exist"),
    (["perturb", "{nosae}"], "is neither an SAE folder"),
    (["dashboard", "{nosae}"], "is neither an SAE folder"),
    (["compare", "{nosae}"], "is neither an SAE folder"),
    (["steer", "{file}", "--feature", "1", "--scale", "1", "--prompt", "hi"], "{file}"),
    (["logit-lens", "{nosae}", "--feature", "1"], "does not exist"),
    (["neurons", "--layer", "0", "--compare-sae", "{nosae}"], "does not exist"),
    (["frontier", "{nosae}"], "does not exist"),
    (["train", "--config", "{nosae}"], "no such file"),
    (["cache", "--hooks", "h"], "the following arguments are required: --out"),
    (["tokens", "{sae}"], "the following arguments are required: --feature"),
    (["graph", "x", "--transcoders", "{nosae}"], "does not exist"),
    (["graph", "x", "--transcoders", "{sae}", "--out", "{file}"], "is a file; give a folder"),
    (["graph", "x", "--transcoders", "{sae}", "--max-nodes", "0"], "must be a positive integer"),
    (["graph", "x", "--transcoders", "{sae}", "--device", NO_CUDA], f"device '{NO_CUDA}'"),
    (["connections", "{nosae}", "{sae}"], "does not exist"),
    (["connections", "{sae1}", "{sae}"], "give the earlier layer's dictionary first"),
    (["connections", "{sae}", "{sae}", "--out", "{file}"], "is a file; give a folder"),
    (["connections", "{sae}", "{sae}", "--top-late", "0"], "must be a positive integer"),
    (["maximize", "{sae}", "--feature", "16"], "feature 16 is out of range: this SAE has features 0..15"),
    (["maximize", "{sae}", "--feature", "1", "--out", "{file}/m"], "is a file, so nothing can be created under it"),
    (["maximize", "{sae}", "--feature", "1", "--beam", "0"], "must be a positive integer"),
    (["models", "gpt2"], "unrecognized arguments: gpt2"),
    (["models", "--all"], "unrecognized arguments: --all"),
    ([], "the following arguments are required: COMMAND"),
    (["fit"], "invalid choice: 'fit'"),
]


def _argv(argv: list[str], places: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in places.items()}) for a in argv]


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a language model fails the test: bad input is refused before any is built."""
    for module in (train_lm, options, *cli.COMMANDS):
        if hasattr(module, "load_lm"):
            monkeypatch.setattr(module, "load_lm", _refuse)


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "(nothing)" for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_no_traceback(argv, message, places, capsys, no_model):
    code, err = _run(_argv(argv, places), capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message.format(**{k: str(v) for k, v in places.items()}) in err, err


def test_the_table_covers_every_command():
    named = {argv[0] for argv, _ in BAD if argv}
    commands = set(next(a for a in cli.build_parser()._actions if a.dest == "command").choices)
    counts = {c: sum(1 for argv, _ in BAD if argv[:1] == [c]) for c in commands}
    assert commands <= named and min(counts.values()) >= 2, counts


# ---- the file system refusing: read-only folders, errors while writing --------------------
@contextlib.contextmanager
def _unprivileged():
    """Run as a user who cannot write what is read-only to them (root writes anywhere): as
    `nobody`, keeping root as the saved id to come back to."""
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(65534, 65534, 0)
    os.setresuid(65534, 65534, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


@pytest.fixture
def read_only():
    """A folder nobody but root may write to (under a temporary folder anyone may enter), holding a tiny SAE."""
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    folder = root / "ro"
    SAE(32, 16, hook_name="blocks.0.hook_resid_post").save(folder / "sae")
    for path in (folder / "sae").iterdir():
        path.chmod(0o644)
    for path in (folder / "sae", folder):
        path.chmod(0o555)
    yield folder
    for path in (folder, folder / "sae"):
        path.chmod(0o755)


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{ro}/run"], ["toy", "--out", "{ro}/a/b"], ["cache", "--hooks", "h", "--out", "{ro}/c"],
    ["prune", "{ro}/sae", "--target-l0", "4"], ["steer", "{ro}/sae", "--feature", "1", "--scale", "1", "--prompt", "x"],
], ids=lambda argv: argv[0])
def test_out_in_a_read_only_folder_is_refused_before_any_work(argv, read_only, capsys, no_model):
    with _unprivileged():
        code, err = _run([a.format(ro=read_only) for a in argv], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{read_only} is not writable (a read-only file system, or no permission)" in err, err


def test_an_os_error_while_writing_is_one_line(read_only, capsys):
    """compare writes beside the first SAE by default: in a read-only folder the write itself
    fails, and the CLI says so in one line (what the system said, and the path)."""
    with _unprivileged():
        code, err = _run(["compare", str(read_only / "sae")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: Permission denied: ") and str(read_only) in err, err


def test_missing_parents_of_out_are_created(tmp_path, places, capsys):
    out = tmp_path / "not" / "yet" / "compare.json"
    assert cli.main(["compare", str(places["sae"]), "--out", str(out)]) == 0 and out.is_file()


def test_a_batch_of_one_row_trains(tmp_path):
    """FVU of a constant batch is undefined (NaN in the log), not a ZeroDivisionError."""
    from saelab.train import GroupTrainer, TrainConfig
    from saelab.train.spec import TrainSpec

    trainer = GroupTrainer([TrainSpec(arch="topk", k=2, d_sae=16)], 8, tmp_path / "run",
                           TrainConfig(total_steps=3, log_every=1))
    trainer.fit([torch.randn(1, 8) for _ in range(3)])
    fvu = [json.loads(line)["saes"]["topk_16_k2"]["fvu"] for line in (tmp_path / "run" / "log.jsonl").open()]
    assert len(fvu) == 3 and all(f != f for f in fvu)


def test_number_types():
    assert (options.positive_int("3"), options.positive_float("0.5"), options.non_negative_int("0")) == (3, 0.5, 0)
    for parse, bad in [(options.positive_int, ["0", "-2", "1.5", "x", ""]), (options.positive_float, ["0", "-1", "nan", "w"]),
                       (options.non_negative_int, ["-1", "2.0"])]:
        for text in bad:
            with pytest.raises(options.argparse.ArgumentTypeError, match="^must be .*, got "):
                parse(text)


def test_check_out():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "f").write_text("x")
        assert options.check_out(tmp / "new" / "deeper") == tmp / "new" / "deeper"
        assert options.check_out(tmp) == tmp
        assert options.check_out(tmp / "a.json", file=True) == tmp / "a.json"
        for path, file, said in [(tmp / "f", False, "is a file"), (tmp / "f" / "g", False, "is a file, so"),
                                 (tmp, True, "is a folder")]:
            with pytest.raises(options.ConfigError, match=said):
                options.check_out(path, file=file)


def test_a_message_of_several_lines_is_printed_on_one(places, capsys, monkeypatch):
    """Messages quoting another library's (the hub's, a tokenizer's) may hold line breaks."""
    from saelab.commands import compare
    from saelab.errors import MissingFileError

    def fail(*args, **kwargs):
        raise MissingFileError("'x' could not be loaded:\nWe couldn't connect.\n  Check your connection.")

    monkeypatch.setattr(compare, "run_compare", fail)
    code, err = _run(["compare", str(places["sae"])], capsys)
    assert (code, err) == (2, "error: 'x' could not be loaded: We couldn't connect. Check your connection.\n")


# ---- Ctrl-C ----------------------------------------------------------------------------------
TOY = ["toy", "--d", "8", "--n-features", "16", "--width", "16", "--arch", "topk", "--k", "2", "--steps", "600",
       "--batch-tokens", "32"]  # checkpoints at steps 500 and 600


def _interrupt_at(monkeypatch, at_step: int):
    """SAETrainer.update raises KeyboardInterrupt (as Ctrl-C would) when asked for step `at_step`."""
    update = trainer_module.SAETrainer.update

    def interrupted(self, step, *args, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt
        return update(self, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module.SAETrainer, "update", interrupted)


def test_ctrl_c_says_where_the_checkpoint_is_and_rerunning_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    assert cli.main(TOY + ["--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "stopped"
    _interrupt_at(monkeypatch, 550)
    code, err = _run(TOY + ["--out", str(run)], capsys)
    assert code == cli.INTERRUPTED == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"training stopped at step 550 of 600; the last checkpoint, {run / 'checkpoint.safetensors'}, holds " \
           "step 500: rerunning the same command (same run folder and settings) resumes from it" in err, err
    monkeypatch.undo()
    assert cli.main(TOY + ["--out", str(run)]) == 0
    whole, resumed = (SAE.load(path / "saes" / "topk_16_k2") for path in (tmp_path / "whole", run))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_ctrl_c_before_the_first_checkpoint(tmp_path, monkeypatch):
    from saelab.pipelines.toy import ToySweepConfig, run_toy_sweep

    _interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted, match="training stopped at step 7 of 600, before its first checkpoint "
                                          r"\(one every 500 steps\); rerunning the same command starts it again"):
        run_toy_sweep(ToySweepConfig(steps=600, arch=["topk"], k=[2]), tmp_path / "run")


def test_ctrl_c_while_caching_activations_says_what_is_kept(tiny_model, tmp_path):
    """An interrupted cache keeps its whole shards; the message says so (and rerunning resumes:
    tests/test_cache.py)."""
    from saelab.data.cache import cache_activations
    from saelab.lm.hooked import HookedLM

    def rows():
        for i in range(20):
            if i == 13:
                raise KeyboardInterrupt
            yield torch.arange(16) % 60 + 2

    with pytest.raises(Interrupted, match=f"caching activations into {tmp_path / 'c'} stopped with 12 contexts "
                                          r"cached \(in whole shards, kept\): rerunning the same command resumes"):
        cache_activations(HookedLM.load(tiny_model), rows(), "blocks.0.hook_resid_post", tmp_path / "c",
                          shard_contexts=4, progress=False)


def test_ctrl_c_elsewhere_is_one_line(tmp_path, capsys, monkeypatch, places):
    from saelab.commands import compare

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_compare", stop)
    code, err = _run(["compare", str(places["sae"])], capsys)
    assert (code, err) == (130, "interrupted: stopped by Ctrl-C\n")


# ---- edge values said plainly -----------------------------------------------------------------
def test_context_length_above_the_models_maximum_is_a_stated_clamp(tiny_model, corpus, capsys):
    from saelab.lm.hooked import HookedLM
    from saelab.lm.resolve import fit_context_length, heldout_contexts

    tiny_lm = HookedLM.load(tiny_model)
    top, _ = tiny_lm.context_length, capsys.readouterr()
    assert fit_context_length(tiny_lm, None) == min(128, top) and fit_context_length(tiny_lm, top - 1) == top - 1
    assert capsys.readouterr().err == ""
    assert fit_context_length(tiny_lm, top + 1000) == top
    assert heldout_contexts(tiny_lm, str(corpus), 2, top + 1000).shape == (2, top)
    err = capsys.readouterr().err
    assert err == f"note: context length {top + 1000} is more than {tiny_lm.name}'s maximum, {top}; using {top}\n"


# ---- where outputs go by default ---------------------------------------------------------------
def test_outputs_about_an_sae_of_a_run_go_in_the_run_folder_not_its_saes(tmp_path):
    assert options.beside_sae(tmp_path / "run" / "saes" / "relu_64", "pruned") == tmp_path / "run" / "relu_64-pruned"
    assert options.beside_sae(tmp_path / "mine" / "sae", "perturb") == tmp_path / "mine" / "sae-perturb"
    assert options.beside_sae("sae/", "steer") == Path("sae-steer")


@pytest.fixture(scope="module")
def tiny_model(save_tiny_hf, tmp_path_factory):
    """A random-init tiny GPT-NeoX (d_model 32, context 16) and a word-level tokenizer."""
    return save_tiny_hf("gpt_neox", tmp_path_factory.mktemp("tiny") / "lm")


@pytest.mark.parametrize("argv, written", [
    (["prune", "{sae}", "--target-l0", "4"], "relu-pruned/metrics.json"),
    (["perturb", "{sae}", "--cos", "0.5"], "relu-perturb/perturb.json"),
    (["perturb", "{run}", "--cos", "0.5"], "relu-perturb/perturb.json"),  # a run folder holding one SAE
    (["steer", "{sae}", "--feature", "1", "--scale", "1", "--prompt", "w2 w3", "--max-new-tokens", "2"],
     "relu-steer/steer.json"),
], ids=lambda v: " ".join(v[:1]) if isinstance(v, list) else None)
def test_prune_perturb_steer_write_beside_the_sae_never_in_saes(argv, written, tiny_model, corpus, tmp_path, capsys):
    """For an SAE of a run (RUN/saes/NAME), the default output is RUN/NAME-<what>, so saes/
    still holds only the run's SAEs."""
    run = tmp_path / "run"
    SAE(32, 16, hook_name="blocks.0.hook_resid_post", model_name=str(tiny_model)).save(run / "saes" / "relu")
    text = [] if argv[0] == "steer" else ["--source", str(corpus), "--eval-contexts", "2", "--context-length", "16"]
    assert cli.main([a.format(sae=run / "saes" / "relu", run=run) for a in argv] + text) == 0
    assert (run / written).is_file()
    assert sorted(p.name for p in (run / "saes").iterdir()) == ["relu"]
