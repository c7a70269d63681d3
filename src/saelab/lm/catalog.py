"""What models this machine can run without the internet, for `saelab models`.

Three kinds: the offline default LM and the other named builds such as the minuscule LM
(`saelab.lm.default.LM_CONFIGS`, built on first use), named models from installed pip packages
(`saelab.lm.gguf.NAMED_MODELS`), and the folders saelab has built or converted under
`$SAELAB_HOME/models`. Sizes are bytes on disk; nothing is loaded or built to list them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from saelab.errors import MissingFileError
from saelab.lm.gguf import CONVERT_INFO, NAMED_MODELS, converted_folder, named_model_file
from saelab.paths import models_dir


@dataclass
class ModelEntry:
    name: str  # what `--model` takes
    kind: str  # "default", "built" (another named build), "named" or "converted"
    status: str  # "ready", "built on first use", "converted on first use", "not installed: <how>"
    path: str | None  # the folder or file behind it
    size_bytes: int | None

    def to_row(self) -> dict:
        size = None if self.size_bytes is None else f"{self.size_bytes / 1e6:.0f} MB"
        return {"model": self.name, "kind": self.kind, "size": size, "status": self.status, "path": self.path}


def list_models() -> list[ModelEntry]:
    """The default LM and the other named builds (the minuscule LM), every named model, and
    every other built folder under models_dir()."""
    from saelab.lm.default import BUILD_INFO

    entries = _build_entries()
    listed = {Path(e.path) for e in entries}
    for name, named in NAMED_MODELS.items():
        entries.append(_named_entry(name, named.install))
        if entries[-1].path and entries[-1].status == "ready":
            listed.add(Path(entries[-1].path))
    for folder in sorted(models_dir().glob("*")) if models_dir().is_dir() else []:
        if folder.is_dir() and not folder.name.startswith(".") and folder not in listed:
            done = (folder / CONVERT_INFO).exists() or (folder / BUILD_INFO).exists()
            entries.append(ModelEntry(str(folder), "converted", "ready" if done else "incomplete",
                                      str(folder), folder_size(folder)))
    return entries


def _build_entries() -> list[ModelEntry]:
    """One entry per named build (`saelab.lm.default.LM_CONFIGS`): ready, or built on first use."""
    from saelab.lm.default import BUILD_INFO, LM_BUILD_TIMES, LM_CONFIGS

    entries = []
    for name, config in LM_CONFIGS.items():
        folder = models_dir() / config.folder_name()
        built = (folder / BUILD_INFO).exists()
        status = "ready" if built else f"built on first use ({LM_BUILD_TIMES[name]}, offline)"
        entries.append(ModelEntry(name, "default" if name == "default" else "built", status, str(folder),
                                  folder_size(folder) if built else None))
    return entries


def _named_entry(name: str, install: str) -> ModelEntry:
    if importlib.util.find_spec(NAMED_MODELS[name].package) is None:
        return ModelEntry(name, "named", f"not installed: {install}", None, None)
    try:
        gguf = named_model_file(name)
    except MissingFileError as err:
        return ModelEntry(name, "named", str(err), None, None)
    folder = converted_folder(gguf)
    if (folder / CONVERT_INFO).exists():
        return ModelEntry(name, "named", "ready", str(folder), folder_size(folder))
    return ModelEntry(name, "named", "converted on first use (~30 s)", str(gguf), gguf.stat().st_size)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
