"""Where saelab keeps what it builds for the user (the default tokenizer and LM).

`$SAELAB_HOME` if set, else `$XDG_CACHE_HOME/saelab`, else `~/.cache/saelab`: a cache, since
everything in it can be rebuilt offline from the standard library."""

from __future__ import annotations

import os
from pathlib import Path


def saelab_home() -> Path:
    """The cache root (not created here: callers create what they write)."""
    if os.environ.get("SAELAB_HOME"):
        return Path(os.environ["SAELAB_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "saelab"


def models_dir() -> Path:
    """Models saelab builds, one Hugging Face folder each."""
    return saelab_home() / "models"
