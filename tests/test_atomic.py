import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab.atomic import atomic_path, save_tensors, write_json


def test_write_json_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    write_json(target, {"x": torch.tensor(2.5)})
    assert json.loads(target.read_text()) == {"x": 2.5}
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_save_tensors_roundtrip(tmp_path):
    t = {"w": torch.randn(3, 4).T}  # non-contiguous on purpose
    save_tensors(tmp_path / "t.safetensors", t)
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], t["w"])


def test_written_files_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_temp_dir_follows_umask_and_sits_beside_target(tmp_path):
    from saelab.atomic import temp_dir

    old = os.umask(0o022)
    try:
        tmp = temp_dir(tmp_path / "model", ".building")
    finally:
        os.umask(old)
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.") and tmp.name.endswith(".building")
    assert tmp.stat().st_mode & 0o777 == 0o755


def test_write_json_turns_scalars_arrays_and_paths_into_json(tmp_path):
    """One `default=` hook (json_default) for every JSON writer: numpy / torch scalars and
    arrays as numbers and lists, paths as strings; anything else fails naming its type."""
    obj = {"np": np.float32(0.5), "arr": np.arange(3), "t0": torch.tensor(2), "t": torch.tensor([[1.5], [2.0]]),
           "path": tmp_path / "x", "i64": np.int64(7)}
    path = write_json(tmp_path / "o.json", obj)
    assert json.loads(path.read_text()) == {"np": 0.5, "arr": [0, 1, 2], "t0": 2, "t": [[1.5], [2.0]],
                                            "path": str(tmp_path / "x"), "i64": 7}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(tmp_path / "bad.json", {"x": object()})


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_every_writer_gives_umask_permissions(tmp_path, umask, mode):
    """safetensors 0.8 recreates its file as 0600 (an SAE on a shared filesystem would be
    unreadable to colleagues); every kind of write ends with 0o666 & ~umask."""
    from saelab.data.cache.format import save_npy
    from saelab.plots import save_figure
    from saelab.sae import SAE

    old = os.umask(umask)
    try:
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        write_json(tmp_path / "a.json", {})
        save_npy(tmp_path / "a.npy", np.zeros(3))
        import matplotlib.pyplot as plt
        save_figure(plt.figure(figsize=(1, 1)), tmp_path / "a.png")
        SAE(4, 8).save(tmp_path / "sae")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


_KILLED_WRITER = """
import os, sys, time
from saelab.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def _writer(tmp_path, target):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _age(paths, seconds):
    for p in paths:
        os.utime(p, (p.stat().st_atime - seconds, p.stat().st_mtime - seconds))


def test_temps_of_a_killed_write_are_removed_by_the_next_write_there(tmp_path, monkeypatch):
    import signal

    from saelab import atomic

    (tmp_path / "keep.tmp").write_text("not ours")
    proc = _writer(tmp_path, tmp_path / "a.txt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob(".a.txt.*.saelab-tmp"))
    assert len(stale) == 1 and stale[0].read_text() == "half"
    folder = tmp_path / ".b.safetensors.x.saelab-tmp"  # save_tensors's kind, killed inside safetensors
    folder.mkdir()
    (folder / ".tmpabc123").write_text("part")
    monkeypatch.setattr(atomic, "_swept", set())  # "the next run"
    write_json(tmp_path / "other.json", {})  # not stale yet: a write from seconds ago may be alive
    assert stale[0].exists() and folder.exists()
    _age(stale + [folder], atomic.STALE_AFTER_S + 1)
    monkeypatch.setattr(atomic, "_swept", set())
    write_json(tmp_path / "other.json", {})
    assert sorted(os.listdir(tmp_path)) == ["keep.tmp", "other.json"]


def test_a_live_write_is_never_swept_however_old(tmp_path):
    from saelab.atomic import STALE_AFTER_S, sweep_stale_temps

    proc = _writer(tmp_path, tmp_path / "a.txt")
    try:
        live = list(tmp_path.glob(".a.txt.*.saelab-tmp"))
        _age(live, STALE_AFTER_S + 100)
        assert sweep_stale_temps(tmp_path) == [] and live[0].exists()
    finally:
        proc.kill()
        proc.wait()
    assert sweep_stale_temps(tmp_path) == live  # its writer is gone: now it is stale


def test_without_flock_writes_work_and_nothing_is_swept(tmp_path, monkeypatch):
    """Windows has no flock: temporaries are closed before the rename (an open handle would
    block it there) and never swept, since a live write could not be told from a dead one."""
    from saelab import atomic

    monkeypatch.setattr(atomic, "fcntl", None)
    leftover = tmp_path / ".old.txt.abc.saelab-tmp"
    leftover.write_text("?")
    _age([leftover], atomic.STALE_AFTER_S + 1)
    monkeypatch.setattr(atomic, "_swept", set())
    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == [leftover.name, "a.json", "t.safetensors"]
