"""The offline default LM: cache location, a real (tiny) build, determinism, atomicity."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saelab.lm.default as default
from saelab.data.corpus import load_stdlib, pack, split_documents
from saelab.errors import ConfigError, CorruptFileError, MissingFileError
from saelab.lm.default import (TINY_CONFIG, DefaultLMConfig, build_default_lm, default_lm_path,
                               load_default_lm, unigram_loss)
from saelab.lm.hooked import HookedLM
from saelab.paths import models_dir, saelab_home

# smaller still than TINY_CONFIG: for the tests that build more than once
MICRO = dataclasses.replace(TINY_CONFIG, steps=8, max_bytes=60_000, vocab_size=300,
                            eval_contexts=4, warmup_steps=2)


def test_cache_location_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAELAB_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert saelab_home() == tmp_path / "home" / ".cache" / "saelab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert saelab_home() == tmp_path / "xdg" / "saelab"
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "mine"))
    assert saelab_home() == tmp_path / "mine"
    assert models_dir() == tmp_path / "mine" / "models"


def test_tiny_lm_is_a_real_model(tiny_lm_path):
    info = json.loads((tiny_lm_path / "build_info.json").read_text())
    assert info["heldout_loss"] < info["unigram_loss"] - 0.5
    assert info["unigram_loss"] < info["uniform_loss"] == pytest.approx(math.log(512))
    assert info["corpus"]["fingerprint"] == load_stdlib(max_bytes=TINY_CONFIG.max_bytes).fingerprint
    assert info["config"] == dataclasses.asdict(TINY_CONFIG)
    assert info["build_seconds"] > 0


def test_tiny_lm_loads_through_hooked_lm_and_reproduces_heldout_loss(tiny_lm_path, tiny_lm):
    lm = tiny_lm
    assert (lm.n_layers, lm.d_model, lm.d_mlp, lm.context_length) == (2, 32, 128, 32)
    assert lm.parallel_residual and lm.model.config.model_type == "gpt_neox"
    assert lm.bos_token_id == 0 and lm.tokenizer.decode([0]) == "<|endoftext|>"
    src = "def f(x):\n    return {'a': x}  # comment\n"
    assert lm.tokenizer.decode(lm.tokenizer(src, add_special_tokens=False)["input_ids"]) == src
    # the recorded held-out loss, recomputed through the corpus functions and HookedLM.loss
    corpus = load_stdlib(max_bytes=TINY_CONFIG.max_bytes)
    _, held_docs = split_documents(corpus.documents, TINY_CONFIG.holdout_frac, 0)
    held = pack(held_docs, lm.tokenizer, 32, progress=False)
    held = held[torch.linspace(0, len(held) - 1, TINY_CONFIG.eval_contexts).round().long()]
    info = json.loads((tiny_lm_path / "build_info.json").read_text())
    assert float(lm.loss(held)) == pytest.approx(info["heldout_loss"], abs=1e-4)


def test_same_seed_same_model_other_seed_differs(tmp_path):
    a = build_default_lm(tmp_path / "a", MICRO, progress=False)
    b = build_default_lm(tmp_path / "b", MICRO, progress=False)
    c = build_default_lm(tmp_path / "c", dataclasses.replace(MICRO, seed=1), progress=False)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_built_model_files_are_readable_by_the_group(tmp_path):
    """A model folder in a shared cache: save_pretrained's model.safetensors (0600 from
    safetensors) gets the umask's permissions like every other file."""
    old = os.umask(0o022)
    try:
        folder = build_default_lm(tmp_path / "lm", MICRO, progress=False)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(default, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_default_lm(tmp_path / "lm", MICRO, progress=False)
    assert os.listdir(tmp_path) == [".lm.lock"]  # the lock file stays (see _build_lock)


def _start_build_and_wait(folder):
    """A real build of MICRO into `folder` in a child process, returned once its hidden
    `.building` folder exists (so it holds the build lock)."""
    script = (f"from saelab.lm.default import build_default_lm\nfrom tests.test_default_lm "
              f"import MICRO\nbuild_default_lm({str(folder)!r}, MICRO, progress=False)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not _building(folder):
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.02)
    return proc


def _building(folder):
    return sorted(folder.parent.glob(f".{folder.name}.*.building"))


@pytest.mark.slow
def test_next_build_removes_what_a_kill_9_left_but_not_a_live_build(tmp_path):
    """A build killed by SIGKILL leaves its `.building` folder (nothing runs to remove it);
    the next build of that name removes it, but only once no build of that name is alive:
    a stopped (not dead) build's folder is left alone."""
    folder = tmp_path / "lm"
    proc = _start_build_and_wait(folder)
    left = _building(folder)
    os.kill(proc.pid, signal.SIGSTOP)  # alive, lock held, not progressing
    try:
        build_default_lm(folder, MICRO, progress=False)
        assert _building(folder) == left  # in use: kept
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and _building(folder) == left
    build_default_lm(folder, MICRO, progress=False)
    assert _building(folder) == [] and (folder / "build_info.json").exists()
    assert sorted(os.listdir(tmp_path)) == [".lm.lock", "lm"]


def test_damaged_default_lm_says_delete_the_folder_to_rebuild(tmp_path, monkeypatch):
    """A finished build (build_info.json present) whose weights were damaged or lost since is
    not rebuilt silently; the error names the folder to delete."""
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    path = default_lm_path(config=MICRO, progress=False)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=f"delete {re.escape(str(path))} .*rebuilt"):
        load_default_lm(config=MICRO)
    weights.unlink()
    with pytest.raises(MissingFileError, match=f"delete {re.escape(str(path))} .*rebuilt"):
        load_default_lm(config=MICRO)


def test_default_lm_path_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path))
    with pytest.raises(MissingFileError, match="not built"):
        default_lm_path(build=False, config=MICRO)
    path = default_lm_path(config=MICRO, progress=False)
    assert path.parent == tmp_path / "models" and path.name.startswith("default-lm-v1-")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_lm_path(build=False, config=MICRO) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    lm = load_default_lm(config=MICRO)
    assert isinstance(lm, HookedLM) and lm.d_model == MICRO.d_model


def test_folder_names_and_config_checks():
    assert DefaultLMConfig().folder_name() == "default-lm-v1"
    assert TINY_CONFIG.folder_name() != MICRO.folder_name() != "default-lm-v1"
    assert MICRO.folder_name() == dataclasses.replace(MICRO).folder_name()
    with pytest.raises(ConfigError, match="vocab_size"):
        DefaultLMConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="n_heads"):
        DefaultLMConfig(d_model=30, n_heads=4)


def test_unigram_loss_by_hand():
    train = torch.tensor([[0, 1, 1, 2]])  # targets 1, 1, 2 over vocab 3 -> counts+1 = 1, 3, 2
    held = torch.tensor([[0, 2, 0]])  # targets 2, 0
    expected = -(math.log(2 / 6) + math.log(1 / 6)) / 2
    assert unigram_loss(train, held, 3) == pytest.approx(expected)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = DefaultLMConfig(steps=110, warmup_steps=10, lr=1.0)
    lrs = [default._lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
