"""Load an SAE and the model it reads, and check that they fit, for reports and commands."""

from __future__ import annotations




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
