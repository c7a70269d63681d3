"""The model layer: the SAE (and transcoder) module, its config, the architecture classes and
the SAELens-compatible folder format. `from saelab.sae import SAE` is the usual entry point."""

from saelab.sae.config import SAEConfig
from saelab.sae.format import is_sae_folder, load_sae, sae_folders, save_sae
from saelab.sae.model import SAE, ForwardOutput, SparseCode, geometric_median

__all__ = ["SAE", "SAEConfig", "ForwardOutput", "SparseCode", "geometric_median", "is_sae_folder", "load_sae", "sae_folders", "save_sae"]
