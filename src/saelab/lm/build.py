"""Build a model folder once, atomically, safe against concurrent and killed builds.

The offline default LM and converted GGUF models are both built here: into a hidden
`.<name>.<random>.building` folder beside the target, which is renamed into place only when
complete (a `marker` file written last says so), so an interrupted build never looks finished;
its files get the umask's permissions first.
Every build of a name holds a shared flock on `.<name>.lock` beside it while it runs."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from saelab.atomic import follow_umask, temp_dir


def build_folder(folder: str | Path, build: Callable[[Path], None], marker: str) -> Path:
    """Run `build(tmp)` in a temp folder beside `folder`, then rename it into place; `build`
    must write `marker` last. Temp folders of killed builds of the same name are removed first
    (see `_build_lock`). A concurrent build that finished first wins. Returns `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        if (folder / marker).exists():  # built by another process while we waited
            return folder
        tmp = temp_dir(folder, ".building")
        try:
            build(tmp)
            follow_umask(tmp)  # safetensors writes 0600: colleagues sharing the cache could not read it
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / marker).exists():  # not a finished concurrent build: ours wins
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Held (shared) by every build of `folder` while it runs, on `.<name>.lock` beside it.

    A build that can take it exclusively knows no other build of that name is alive, so the
    `.building` folders beside it are left by killed ones (kill -9, power cut: nothing ran to
    remove them) and it deletes them. The kernel drops a dead process's flock, so neither pids
    (reused) nor ages (a live build may be slow) are trusted. The lock file stays: removing a
    lock file others may have open would let two builds hold "the" lock at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock, so stale folders are left alone
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another build of this name is running: its folder is not stale
        else:
            _remove_stale_builds(folder)
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def _remove_stale_builds(folder: Path) -> None:
    prefix, suffix = f".{folder.name}.", ".building"
    for path in folder.parent.glob(f"{prefix}*{suffix}"):
        if "." not in path.name[len(prefix):-len(suffix)]:  # mkdtemp's name, not another model's
            shutil.rmtree(path, ignore_errors=True)
