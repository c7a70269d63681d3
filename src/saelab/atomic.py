"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

A crash or `kill -9` mid-write leaves either the old file or the new one, never half of one.

The temporary file is `.<name>.<random>.saelab-tmp` beside the target, and its writer holds an
exclusive flock on it until it is renamed into place. safetensors (0.8) makes its own temporary
file and renames it over the path it is given, so `save_tensors` writes inside a
`.<name>.<random>.saelab-tmp` folder instead, locked the same way. So a killed write leaves one
`.saelab-tmp` entry that nobody holds the lock of; the first write of a process into a folder
removes those (`sweep_stale_temps`): only when unlocked (the kernel drops a dead process's
flock) and unchanged for `STALE_AFTER_S` seconds (so a concurrent writer caught between
creating its temporary and locking it, microseconds, is not taken for a dead one; the margin
also covers a file server's clock running a little apart from this machine's).
Every file written gets the permissions `open()` would give it under the umask, whatever the
writer created (mkstemp and safetensors make 0600)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; temporaries are written and renamed, but never swept
    fcntl = None

TEMP_SUFFIX = ".saelab-tmp"
STALE_AFTER_S = 10.0
_swept: set[str] = set()  # folders this process has already swept


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`, with the
    permissions open() gives under the umask.

    `fsync=False` keeps the all-or-nothing rename but skips the flush to disk (~5 ms a file):
    for many small files that can be rebuilt (dashboard pages), where durability after a power
    cut is not worth minutes."""
    path = _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    fd = _hold_lock(fd)
    try:
        yield Path(tmp)
        _finish(Path(tmp), path, fsync)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _release(fd)  # after the rename or unlink: the lock covers the whole life of the name


@contextmanager
def _atomic_in_folder(path: str | Path) -> Iterator[Path]:
    """Like `atomic_path`, for writers that make their own temporary file beside the path they
    are given: the yielded path sits in a locked `.<name>.<random>.saelab-tmp` folder."""
    path = _prepare(path)
    folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    fd = _hold_lock(os.open(folder, os.O_RDONLY)) if fcntl is not None else None
    try:
        yield Path(folder) / path.name
        _finish(Path(folder) / path.name, path, fsync=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _release(fd)


def _prepare(path: str | Path) -> Path:
    """The target as a Path, its folder made, and swept once per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path.parent.resolve()) not in _swept:
        sweep_stale_temps(path.parent)
    return path


def _finish(tmp: Path, path: Path, fsync: bool) -> None:
    os.chmod(tmp, 0o666 & ~_umask())  # after the writer: a file it recreated would be 0600
    if fsync:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def sweep_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the `.saelab-tmp` files and folders in `folder` that killed writes left: unlocked
    and unchanged for `STALE_AFTER_S` seconds. Returns what it removed. Without flock
    (Windows) nothing is removed: a live write could not be told from a dead one."""
    folder = Path(folder)
    _swept.add(str(folder.resolve()))
    removed = []
    for entry in folder.glob(f".*{TEMP_SUFFIX}"):
        if _is_stale(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _is_stale(entry: Path) -> bool:
    if fcntl is None:
        return False
    try:
        if entry.is_symlink():
            return False
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        return time.time() - st.st_mtime >= STALE_AFTER_S and os.stat(entry).st_ino == st.st_ino
    except OSError:  # BlockingIOError: a live write holds it
        return False
    finally:
        os.close(fd)  # drops the lock taken to test it


def _hold_lock(fd: int) -> int | None:
    """Take an exclusive flock on a new temporary's fd and keep the fd open. Without flock
    (Windows) close it at once and return None: an open handle there blocks the rename."""
    if fcntl is None:
        os.close(fd)
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def temp_dir(target: Path, suffix: str) -> Path:
    """A new hidden folder beside `target` to build it in before renaming it into place, with
    the permissions mkdir would give (mkdtemp makes 0700, which a renamed result would keep)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def follow_umask(folder: str | Path) -> None:
    """Give every file under `folder` the permissions open() would under the umask: for
    folders other libraries fill (a model's save_pretrained writes model.safetensors 0600)
    before saelab renames them into place."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file, written atomically (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with _atomic_in_folder(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


def json_default(obj):
    """`default=` hook for json.dumps: numpy / torch scalars and arrays as numbers and lists,
    paths as strings; anything else is a TypeError naming its type."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
