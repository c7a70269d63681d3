"""Load an SAE and the model it reads, and check that they fit, for reports and commands."""

from __future__ import annotations

from pathlib import Path

from saelab.errors import ConfigError


def load_sae(sae) -> tuple:
    """(SAE, path string or None) from an SAE object or an SAE folder."""
    from saelab.sae import SAE

    if isinstance(sae, SAE):
        return sae.eval(), None
    return SAE.load(sae).eval(), str(sae)


def load_model(model, sae):
    """A HookedLM from a HookedLM, a model folder or hub name; None: the SAE's `model_name`
    when it is a local folder, else the offline default LM (built on first use)."""
    from saelab.lm.hooked import HookedLM

    if isinstance(model, HookedLM):
        return model
    if model is not None:
        return HookedLM.load(model)
    name = sae.cfg.model_name
    if name and Path(name).expanduser().is_dir():
        return HookedLM.load(name)
    from saelab.lm.default import load_default_lm

    return load_default_lm()


def check_compatible(lm, sae) -> None:
    """ConfigError unless the SAE names a hook of this model with its input's width (and, for a
    transcoder, an output hook with its output's width)."""
    cfg = sae.cfg
    if not cfg.hook_name:
        raise ConfigError("the SAE's config has no hook_name, so it is unknown which activations "
                          "it reads; set cfg.hook_name (e.g. blocks.0.hook_resid_post)")
    for hook, dim, what in ((cfg.hook_name, cfg.d_in, "d_in"), (cfg.hook_name_out, cfg.d_out, "d_out")):
        if hook is None:
            continue
        width = lm.hook_dim(hook)  # ConfigError listing valid names if unknown
        if width != dim:
            raise ConfigError(f"the SAE's {what} is {dim} but {hook} of {lm.name or 'the model'} "
                              f"is {width} wide: this SAE was not trained on this model")
