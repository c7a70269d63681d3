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


def layer_of(name: str | None) -> int | None:
    """The block a hook name belongs to; None for model-level hooks, no name, or a name that is
    not a hook (for callers that only use the layer when it is known)."""
    try:
        return parse_hook(name).layer if name else None
    except ConfigError:
        return None


LAYER_SET = "layers"  # shorthand: every layer's residual stream, attention and MLP outputs
LAYER_SET_POINTS = ("hook_attn_out", "hook_mlp_out", "hook_resid_post")


def expand_hooks(items, n_layers: int) -> list[str]:
    """Hook names from a list that may hold the shorthand `layers` (every layer's
    hook_attn_out, hook_mlp_out and hook_resid_post: the writes into the residual stream and the
    stream itself, as seed 002 compares them) or `layers:0,1` (those layers only; `a-b` ranges
    too). Other items are hook names, kept as given; duplicates are dropped, order kept."""
    out: list[str] = []
    for item in items:
        if item == LAYER_SET or item.startswith(LAYER_SET + ":"):
            layers = _layer_list(item.partition(":")[2], n_layers) if ":" in item else range(n_layers)
            out += [f"blocks.{layer}.{point}" for layer in layers for point in LAYER_SET_POINTS]
        else:
            parse_hook(item)
            out.append(item)
    return list(dict.fromkeys(out))


def _layer_list(text: str, n_layers: int) -> list[int]:
    """`0,1` or `2-4` or `0,3-5` -> layer numbers, each checked against the model's."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ConfigError(f"{LAYER_SET}:{text} is not a list of layers; write e.g. {LAYER_SET}:0,1 or "
                          f"{LAYER_SET}:0-3") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ConfigError(f"{LAYER_SET}:{text}: layers must be in 0..{n_layers - 1}")
    return layers
