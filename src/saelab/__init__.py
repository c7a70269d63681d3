"""saelab: sparse dictionary learning on language-model activations.

The public API, imported lazily so that `import saelab` stays cheap (no torch, no LM, no
matplotlib until a name is used):

    from saelab import SAE                      # SAE(d_in, d_sae, arch=...); SAE.load(folder)
    from saelab import TrainSpec, GroupTrainer, TrainConfig
    from saelab import load_lm, HookedLM        # the offline default LM, a folder or a hub name
    from saelab import evaluate_saes            # reconstruction / sparsity metrics rows
    from saelab import build_report, write_dashboard
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "SAE": "saelab.sae",
    "SAEConfig": "saelab.sae",
    "load_sae": "saelab.sae",
    "TrainSpec": "saelab.train",
    "TrainConfig": "saelab.train",
    "GroupTrainer": "saelab.train",
    "HookedLM": "saelab.lm.hooked",
    "load_lm": "saelab.lm.resolve",
    "evaluate_saes": "saelab.evals.reconstruction",
    "build_report": "saelab.interpret.report",
    "write_dashboard": "saelab.interpret.dashboard",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
