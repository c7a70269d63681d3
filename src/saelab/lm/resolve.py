"""Which language model a command runs: the one asked for, else the one the SAE was trained on.

One rule for every command, so `prune`, `perturb`, `dashboard` and the rest never disagree:
`model` (a HookedLM, a local folder, a hub name, or "default") wins; without it the SAE's
recorded `model_name` is loaded (a folder, or a hub name, which fails clearly when offline);
the offline default LM serves when nothing names a model, or when the SAE names a default-LM
folder that is not here (another machine's or user's cache: the same seed builds the same model)."""

from __future__ import annotations

from pathlib import Path

from saelab.lm.hooked import HookedLM

DEFAULT = "default"
DEFAULT_FOLDER_PREFIX = "default-lm-"


def model_name_for(model: str | None = None, sae=None) -> str | None:
    """The name `load_lm` loads; None stands for the offline default LM."""
    name = model or (sae.cfg.model_name if sae is not None else None) or None
    if name == DEFAULT:
        return None
    if name is not None and Path(name).name.startswith(DEFAULT_FOLDER_PREFIX) and not Path(name).expanduser().is_dir():
        return None
    return name


def load_lm(model=None, sae=None, device: str = "cpu") -> HookedLM:
    if isinstance(model, HookedLM):
        return model
    name = model_name_for(model, sae)
    if name is None:
        from saelab.lm.default import load_default_lm

        return load_default_lm(device=device)
    return HookedLM.load(name, device=device)
