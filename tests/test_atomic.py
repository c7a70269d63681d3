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
