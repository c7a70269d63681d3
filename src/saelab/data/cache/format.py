"""The on-disk layout of an activation cache, its manifest, and model / tokenizer fingerprints.

    <cache>/manifest.json              what was cached and which shards are finished
    <cache>/tokens/00000.npy           (n_contexts_in_shard, context_length) int32 token ids
    <cache>/acts/<hook>/00000.npy      (n_contexts_in_shard * rows_per_context, d) activations

Shards are plain `.npy` files, so `np.load(path, mmap_mode="r")` maps them without reading
them. A shard holds whole contexts; its rows run context by context, position by position,
from `first_position` (1 when the BOS position is dropped, else 0) to the context's end, so
row r of a shard is context `start + r // rows_per_context`, position
`first_position + r % rows_per_context`. bfloat16 has no numpy dtype: it is stored as the
uint16 bit pattern and viewed back as bfloat16 on reading.

The manifest counts finished shards only (`shards_done`) and says `complete: true` only once
the last one is written; shard files are written atomically before the manifest counts them.
Shard k holds contexts [k * shard_contexts, min((k + 1) * shard_contexts, contexts_done)):
every shard is full but the last of a complete cache, so the manifest stays a few hundred
bytes however large the cache grows (rewriting it after each shard costs nothing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError

FORMAT = "saelab.activation_cache"
VERSION = 1
MANIFEST = "manifest.json"

# name -> (torch dtype activations are converted to, numpy dtype of the file)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
            torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical storage dtype name ("float32", "float16", "bfloat16") for a name or torch dtype."""
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"cache dtype must be one of float32/fp32, float16/fp16, "
                          f"bfloat16/bf16, got {dtype!r}")
    return name


def from_storage(arr: np.ndarray, name: str) -> torch.Tensor:
    """A stored array (numpy, any shape) -> a torch tensor of the cached dtype (shares memory
    when `arr` is writable; read-only memory-maps are copied)."""
    if not arr.flags.writeable:
        arr = np.array(arr)
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def shard_range(manifest: dict, k: int) -> tuple[int, int]:
    """Contexts [start, stop) of shard k."""
    per = manifest["shard_contexts"]
    return k * per, min((k + 1) * per, manifest["contexts_done"])


def shard_file(k: int) -> str:
    return f"{k:05d}.npy"


def tokens_path(root: Path, k: int) -> Path:
    return root / "tokens" / shard_file(k)


def acts_path(root: Path, hook: str, k: int) -> Path:
    return root / "acts" / hook / shard_file(k)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save through an atomic temporary file (np.save on a name would append `.npy`)."""
    from saelab.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def load_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Memory-map a shard and check it is what the manifest says."""
    if not path.exists():
        raise MissingFileError(f"activation cache file {path} is missing (the manifest lists it)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptFileError(f"cannot read cache shard {path}: {err}") from err
    if arr.shape != shape or arr.dtype != dtype:
        raise CorruptFileError(f"cache shard {path} is {arr.shape} {arr.dtype}; the manifest "
                               f"says {shape} {dtype}")
    return arr


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        raise MissingFileError(f"{root} is not an activation cache (no {MANIFEST}); make one "
                               "with saelab.data.cache.cache_activations")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a saelab activation-cache manifest")
    if manifest.get("version") != VERSION:
        raise CorruptFileError(f"{path} has cache format version {manifest.get('version')}; "
                               f"this saelab reads version {VERSION}")
    try:
        per, done, shards = (int(manifest[k]) for k in ("shard_contexts", "contexts_done",
                                                        "shards_done"))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path} lacks a valid {err} entry") from err
    if per < 1 or shards != -(-done // per):
        raise CorruptFileError(f"{path} is inconsistent: {shards} shards of {per} contexts "
                               f"cannot hold {done} contexts")
    return manifest


# ---- fingerprints ------------------------------------------------------------------------------
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "name_or_path",
                         "architectures", "use_cache"}


def model_fingerprint(lm) -> str:
    """sha256 (16 hex digits) of the model's config, parameter names and shapes, and a strided
    sample of 256 values of every parameter (read as float32): tells apart two checkpoints of
    one architecture without hashing gigabytes. A model loaded in another dtype gets another
    fingerprint, since its activations differ too."""
    config = {k: v for k, v in lm.model.config.to_dict().items()
              if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 (16 hex digits) of the tokenizer's vocabulary, merges and special tokens."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def check_same(kind: str, cached, asked, where: Path, hint: str) -> None:
    if cached != asked:
        raise DataError(f"the activation cache at {where} was made with {kind} {cached!r}, "
                        f"not {asked!r}; {hint}")
