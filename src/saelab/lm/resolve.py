"""Which language model a command runs: the one asked for, else the one the SAE was trained on.

One rule for every command, so `prune`, `perturb`, `dashboard` and the rest never disagree:
`model` (a HookedLM, a local folder, a hub name, a .gguf file, a named model such as
"smollm2-135m", a named build such as "minuscule", or "default") wins; without it the SAE's
recorded `model_name` is loaded (a folder, or a hub name, which fails clearly when offline);
the offline default LM serves when nothing names a model, or when the SAE names a default-LM
folder that is not here (another machine's or user's cache: the same seed builds the same model);
a named build's folder that is not here stands for that build, by the same reasoning."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from saelab.data.corpus import token_contexts
from saelab.errors import ConfigError
from saelab.lm.default import LM_CONFIGS, built_name
from saelab.lm.gguf import NAMED_MODELS, gguf_folder, named_model_file
from saelab.lm.hooked import HookedLM

DEFAULT = "default"
DEFAULT_FOLDER_PREFIX = "default-lm-"


def model_name_for(model: str | None = None, sae=None) -> str | None:
    """The name `load_lm` loads; None stands for the offline default LM."""
    name = model or (sae.cfg.model_name if sae is not None else None) or None
    if name is not None and not Path(name).expanduser().is_dir():  # a build from another cache
        folder = Path(name).name
        name = built_name(folder) or (DEFAULT if folder.startswith(DEFAULT_FOLDER_PREFIX) else name)
    return None if name == DEFAULT else name


def check_one_model(saes) -> None:
    """SAEs run together ({label: SAE}) must come from one model: a ConfigError naming two whose
    recorded models (`model_name_for`, so every default-LM name counts as one) differ."""
    names = {label: model_name_for(None, sae) for label, sae in saes.items()}
    first = next(iter(names), None)
    for label, name in names.items():
        if name != names[first]:
            raise ConfigError(f"the SAEs come from different models: {first} from {names[first] or 'the default LM'}, "
                              f"{label} from {name or 'the default LM'}; give SAEs of one model")


def load_lm(model=None, sae=None, device: str = "cpu", dtype: str | torch.dtype = "float32") -> HookedLM:
    """The HookedLM by the rule above, on `device`, its parameters cast to `dtype` (a torch
    dtype or its name: "float32", "bfloat16", "float16"). A HookedLM given is returned as is.
    Besides HF folders and hub ids, `model` may be a `.gguf` file or a named model
    (`saelab.lm.gguf.NAMED_MODELS`, e.g. "smollm2-135m"), converted once into the user cache,
    or a named build (`saelab.lm.default.LM_CONFIGS`, e.g. "minuscule"), built once; the LM's
    `name` is then the name given, so SAEs trained on it record a name every command resolves
    again."""
    if isinstance(model, HookedLM):
        return model
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    name = model_name_for(model, sae)
    if name is None or name in LM_CONFIGS:
        from saelab.lm import default

        lm = default.load_default_lm(device=device) if name is None else \
            default.load_default_lm(device=device, config=default.named_config(name))
        lm.model.to(dtype=dtype)
        lm.name = name or lm.name  # a named build records its name: it resolves on any machine
        return lm
    if name in NAMED_MODELS or name.endswith(".gguf"):
        folder = gguf_folder(named_model_file(name) if name in NAMED_MODELS else name)
        lm = HookedLM.load(folder, device=device, dtype=dtype)
        lm.name = name if name in NAMED_MODELS else str(Path(name).expanduser().resolve())
        return lm
    return HookedLM.load(name, device=device, dtype=dtype)


def heldout_contexts(lm: HookedLM, source: str = "stdlib", n_contexts: int = 64,
                     context_length: int | None = None, *, split: str = "heldout",
                     progress: bool | None = None) -> torch.Tensor:
    """Contexts (n, context_length) of `source`'s held-out split (by default) for evaluation
    and reports; context_length defaults to min(128, the model's)."""
    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer; pass token ids directly")
    length = fit_context_length(lm, context_length)
    if length < 2:
        raise ConfigError(f"context_length must be in 2..{lm.context_length}, got {length}")
    return token_contexts(source, lm.tokenizer, length, split=split, max_contexts=n_contexts, progress=progress)


def fit_context_length(lm: HookedLM, length: int | None) -> int:
    """The context length a job on `lm` uses: `length` (None: min(128, the model's)), or the
    model's maximum where `length` is more, said on stderr (once per model and length): a
    clamp is stated, never silent."""
    if length is None:
        return min(128, lm.context_length)
    if length > lm.context_length:
        _note(f"note: context length {length} is more than {lm.name}'s maximum, {lm.context_length}; "
              f"using {lm.context_length}")
        return lm.context_length
    return length


@functools.cache
def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_sae_fits(lm: HookedLM, sae, hook: str | None = None) -> tuple[str, str]:
    """(input hook, replaced hook) of an SAE on this model, after checking that the names exist
    (an unknown one is an error listing the valid ones), that a transcoder's output comes no
    earlier than its input, and that d_in / d_out match the hooks' widths. `hook` overrides
    the SAE's own cfg.hook_name."""
    hook_in = hook or sae.cfg.hook_name
    if not hook_in:
        raise ConfigError("the SAE's config has no hook_name, so it is unknown which activations "
                          "it reads; set cfg.hook_name (e.g. blocks.0.hook_resid_post) or pass the hook")
    hook_out = sae.cfg.hook_name_out or hook_in
    dims = {name: lm.hook_dim(name) for name in (hook_in, hook_out)}  # unknown name -> ConfigError
    names = lm.hook_names()
    if names.index(hook_out) < names.index(hook_in):
        raise ConfigError(f"transcoder reads {hook_in} but replaces {hook_out}, which the model "
                          "computes earlier; the output hook must come after the input hook")
    for what, name, dim in (("d_in", hook_in, sae.cfg.d_in), ("d_out", hook_out, sae.cfg.d_out)):
        if dims[name] != dim:
            raise ConfigError(f"the SAE's {what} is {dim} but {name} of {lm.name or 'the model'} is "
                              f"{dims[name]} wide: this SAE was not trained on this model")
    return hook_in, hook_out
