"""The SAE folder: `cfg.json` + `sae_weights.safetensors`, in the layout SAELens reads and writes.

Weights: `W_enc (d_in, d_sae)`, `b_enc (d_sae,)`, `W_dec (d_sae, d_out)`, `b_dec (d_out,)`, plus
what the architecture adds: `threshold (d_sae,)` for jumprelu (and batchtopk / matryoshka, which
SAELens also stores as a jumprelu for inference); gated saves b_enc as `b_gate`, plus `b_mag` and
`r_mag`. cfg.json carries SAELens 6's keys (with `metadata.sae_lens_version`, so SAELens keeps
our metadata), the flat keys SAELens 5 reads, and saelab's own full config under
`metadata.saelab` so a round trip through saelab loses nothing. Loading reads saelab folders and
SAELens ones (its current nested format and the older flat one). No pickle.

This module reads and writes (SAEConfig, tensors by saved name); `SAE.save` / `SAE.load` in
`saelab.sae.model` turn those into a module, so this module never imports the model. Each
architecture class names its SAELens architecture; SAELens has no topk or gated transcoder, so
saelab writes those under the SAE name with `d_out`, and only saelab reads them. Everything else
loads in SAELens with identical outputs (tests/fixtures/saelens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saelab.atomic import save_tensors, write_json
from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError
from saelab.lm.hook_names import layer_of
from saelab.sae.architectures import architecture, saelens_architecture
from saelab.sae.config import PROVENANCE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write (nested metadata)


def is_sae_folder(path: Path) -> bool:
    return (Path(path) / CFG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def sae_folders(path: str | Path) -> list[Path]:
    """The SAE folders `path` names: itself, or the SAE folders under its saes/ (a run folder)."""
    path = Path(path)
    if is_sae_folder(path):
        return [path]
    folders = sorted(p for p in (path / "saes").glob("*") if is_sae_folder(p))
    if not folders:
        raise MissingFileError(f"{path} is neither an SAE folder ({CFG_FILE} + {WEIGHTS_FILE}) "
                               f"nor a run folder with SAE folders under saes/")
    return folders


def folder_labels(folders: list[Path]) -> dict[str, Path]:
    """label -> folder: each folder's name, or its run's name and its own where two SAEs share a
    name (two runs' saes/)."""
    def label(folder: Path) -> str:
        same = [f for f in folders if f.name == folder.name]
        return folder.name if len(same) == 1 else f"{folder.parent.parent.name}/{folder.name}"
    return {label(Path(f)): Path(f) for f in folders}


def write_sae_folder(path: str | Path, cfg: SAEConfig, tensors: dict[str, Tensor]) -> Path:
    """Write the folder: tensors (by saved name, cast to cfg.dtype) first, then cfg.json, each atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    save_tensors(path / WEIGHTS_FILE, {k: v.to(dtype) for k, v in tensors.items()})
    write_json(path / CFG_FILE, saelens_cfg(cfg))
    return path


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json in SAELens's format, with saelab's config under metadata.saelab. The training
    text's provenance, where recorded, also fills SAELens's dataset_path, context_size and
    prepend_bos (null, null and true when not recorded)."""
    text = cfg.metadata.get(PROVENANCE) or {}
    dataset, context_size = _dataset_path(text.get("source")), text.get("context_length")
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        "prepend_bos": text.get("prepend_bos", True) is not False,
        "dataset_path": dataset,
        "context_size": context_size,
        "saelab": cfg.to_dict(),
    }
    if cfg.hook_name_out is not None:
        metadata["hook_name_out"] = cfg.hook_name_out
    arch = architecture(cfg.arch)
    out = {
        "architecture": arch.saelens_architecture_name(cfg.is_transcoder),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    # the architecture's own keys (topk: k), and the flat keys SAELens 5 requires (SAELens 6
    # ignores those when metadata.sae_lens_version is set)
    out.update(arch.saelens_keys(cfg))
    out.update(
        model_name=cfg.model_name,
        hook_name=cfg.hook_name,
        hook_layer=layer_of(cfg.hook_name) or 0,  # SAELens 5: 0 for model-level or unknown hooks
        hook_head_index=None,
        dataset_path=dataset,
        context_size=context_size,
    )
    return out


def _dataset_path(source: str | None) -> str | None:
    """SAELens's dataset_path for a saelab text source: the dataset of "hf:NAME", else the spec."""
    return source[3:] if source and source.startswith("hf:") else source


def read_sae_folder(path: str | Path, allow_nonfinite: bool = False) -> tuple[SAEConfig, dict[str, Tensor]]:
    """The config and tensors (by saved name) of a saelab or SAELens SAE folder, with SAELens
    options that change the computation folded into the weights. A tensor holding NaN or Inf is
    refused, by name, unless `allow_nonfinite` (to inspect a broken SAE)."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise MissingFileError(f"SAE folder {path} does not exist")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise MissingFileError(f"SAE folder {path} has no {p.name} (an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{cfg_path} is not valid JSON: {err}") from err
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{weights_path} is not a readable safetensors file: {err}") from err
    if not allow_nonfinite:
        check_finite(tensors, weights_path)
    cfg = config_from_dict(raw, tensors)
    return cfg, _fold_saelens_options(raw, tensors, weights_path)


def check_finite(tensors: dict[str, Tensor], where: str | Path) -> None:
    """Refuse the first tensor holding NaN or Inf, naming it, how many and where the first is."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            n_nan = int(torch.isnan(t).sum())
            raise DataError(f"{where}: tensor {name} holds {n_nan} NaN and {int(bad.sum()) - n_nan} Inf of "
                            f"{t.numel()} values (the first at index {first}); an SAE with non-finite weights "
                            "gives non-finite features. To inspect it anyway: SAE.load(path, allow_nonfinite=True)")


def _fold_saelens_options(raw: dict, tensors: dict, where: Path) -> dict:
    """Fold SAELens options that change the computation into plain weights.

    - topk `rescale_acts_by_decoder_norm`: z is scaled by n = ||W_dec rows|| and f divided by n
      before decoding; the same map is W_enc *= n, b_enc *= n, W_dec /= n.
    - old `scaling_factor` (finetuning): f is multiplied by s before decoding; W_dec *= s."""
    tensors = dict(tensors)
    if raw.get("rescale_acts_by_decoder_norm") and "W_dec" in tensors:
        n = tensors["W_dec"].float().norm(dim=1)
        tensors["W_enc"] = tensors["W_enc"].float() * n
        tensors["b_enc"] = tensors["b_enc"].float() * n
        tensors["W_dec"] = tensors["W_dec"].float() / n.clamp_min(1e-12)[:, None]
    scale = tensors.pop("scaling_factor", tensors.pop("finetuning_scaling_factor", None))
    if scale is not None and "W_dec" in tensors:
        if scale.shape != tensors["W_dec"].shape[:1]:
            raise CorruptFileError(f"{where}: scaling_factor has shape {tuple(scale.shape)}, expected ({tensors['W_dec'].shape[0]},)")
        tensors["W_dec"] = tensors["W_dec"].float() * scale.float()[:, None]
    return tensors


def config_from_dict(raw: dict, tensors: dict | None = None) -> SAEConfig:
    """SAEConfig from a saelab or SAELens cfg.json (nested `metadata` or the older flat format)."""
    if not isinstance(raw, dict):
        raise CorruptFileError("cfg.json must hold a JSON object")
    meta = raw.get("metadata") or {}
    if isinstance(meta.get("saelab"), dict):
        return SAEConfig.from_dict(meta["saelab"])
    missing = [k for k in ("d_in", "d_sae") if k not in raw]
    if missing:
        raise ConfigError(f"cfg.json is missing {missing}; an SAE config needs at least d_in and d_sae")
    arch_name = raw.get("architecture", "standard")
    activation_fn = raw.get("activation_fn_str", raw.get("activation_fn", "relu")) or "relu"
    if arch_name == "standard" and activation_fn == "topk":  # SAELens 5: topk as an activation option
        arch_name = "topk"
    elif activation_fn not in ("relu", "topk"):
        raise ConfigError(f"SAELens activation function {activation_fn!r} is not supported; saelab reads relu and topk")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    norm = raw.get("normalize_activations", "none") or "none"
    if norm not in ("none", None):
        raise ConfigError(
            f"cfg.json asks for normalize_activations={norm!r}; saelab loads SAEs that take raw activations "
            "('none'). Fold the scaling into the weights first."
        )
    d_out = raw.get("d_out") or (tensors["W_dec"].shape[1] if tensors and "W_dec" in tensors else raw["d_in"])
    arch = saelens_architecture(arch_name)
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        arch=arch.name,
        d_out=int(d_out),
        k=int(k) if k is not None and "k" in arch.settings else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_name=raw.get("hook_name", raw.get("hook_point", meta.get("hook_name"))),
        hook_name_out=raw.get("hook_name_out", meta.get("hook_name_out")),
        model_name=raw.get("model_name", meta.get("model_name")),
        dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
    )
