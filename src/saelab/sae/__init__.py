"""The model layer: the SAE (and transcoder) module, its config, the architecture classes and
the SAELens-compatible folder format. `from saelab.sae import SAE` is the usual entry point."""

from saelab.sae.architectures import ACTIVATIONS, architecture
from saelab.sae.config import ArchOptions, SAEConfig
from saelab.sae.format import is_sae_folder, sae_folders
from saelab.sae.model import SAE, ForwardOutput, SparseCode, geometric_median, load_sae, save_sae

__all__ = ["ACTIVATIONS", "ArchOptions", "SAE", "SAEConfig", "ForwardOutput", "SparseCode", "architecture",
           "geometric_median", "is_sae_folder", "load_sae", "sae_folders", "save_sae"]
