"""TransformerLens hook names and their parts, with no model attached (no torch needed).

`saelab.lm.hooked` documents what each point is and installs the hooks; this module only knows
the names, so the SAE folder format and the interpretation code can parse a hook name cheaply."""

from __future__ import annotations

from typing import NamedTuple

from saelab.errors import ConfigError

BLOCK_POINTS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
MODEL_POINTS = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")
MLP_WIDE = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")


class HookPoint(NamedTuple):
    """A hook name's parts: `blocks.3.mlp.hook_post` -> (3, "mlp.hook_post");
    `hook_embed` -> (None, "hook_embed")."""

    layer: int | None
    point: str


def parse_hook(name: str) -> HookPoint:
    """Split a TransformerLens hook name into its layer and point (no check against a model:
    `HookedLM.hook_dim` does that). A name that is neither `blocks.L.<point>` nor a known
    model-level hook is an error naming the forms that are valid."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in BLOCK_POINTS:
        return HookPoint(int(parts[1]), parts[2])
    if name in MODEL_POINTS:
        return HookPoint(None, name)
    raise ConfigError(f"{name!r} is not a hook name; valid forms are blocks.L.<point> with <point> one of "
                      f"{', '.join(BLOCK_POINTS)}, or one of {', '.join(MODEL_POINTS)}")
