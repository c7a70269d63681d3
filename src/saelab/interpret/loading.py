"""Load an SAE and the model it reads, and check that they fit, for reports and commands."""

from __future__ import annotations


from saelab.errors import ConfigError


def load_sae(sae) -> tuple:
    """(SAE, path string or None) from an SAE object or an SAE folder."""
    from saelab.sae import SAE

    if isinstance(sae, SAE):
        return sae.eval(), None
    return SAE.load(sae).eval(), str(sae)


def load_model(model, sae):
    """The HookedLM the SAE is read on (see saelab.lm.resolve for the rule)."""
    from saelab.lm.resolve import load_lm

    return load_lm(model, sae)


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
