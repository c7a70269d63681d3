"""Steer a language model with an SAE feature: what does it write, and which next tokens move?

The steering vector is the feature's raw decoder row, scale * W_dec[i] (not unit-normalised,
as in SAELens-style steering: `scale` is then in units of the feature's activation, the
amount the SAE itself would write for a feature firing at `scale`; the row's norm is reported
beside it). It is added at the SAE's hook (a transcoder's output hook) at every position,
through HookedLM's splices, while the model continues the prompt: greedily, or sampled at a
temperature with a seeded generator (the same seed for every scale, so scale 0 reproduces the
unsteered text). Generation re-runs the forward pass on the growing sequence: the models here
are small, and every position then sees the steered activations of all earlier ones exactly.

Beside the texts: the next-token distribution at the prompt's last position, unsteered and
steered: the tokens whose probability rises and falls most at each scale, and the
probability of the most promoted tokens against the scale (steer.png).
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.errors import ConfigError, DataError
from saelab.lm.hooked import HookedLM, Splice
from saelab.lm.resolve import check_sae_fits
from saelab.plots import save_figure
from saelab.sae import SAE
from saelab.tables import Column, format_rows


@dataclass
class SteerConfig:
    feature: int
    scales: list[float]
    prompt: str
    max_new_tokens: int = 30
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # the sampling generator's, when temperature > 0
    top: int = 8  # tokens listed per direction of change
    plot_tokens: int = 5  # most promoted tokens drawn against the scale

    def __post_init__(self) -> None:
        if not self.scales:
            raise ConfigError("give one or more scales")
        if not self.prompt.strip():
            raise ConfigError("the prompt is empty; give --prompt TEXT")
        if self.max_new_tokens < 1 or self.top < 1 or self.temperature < 0:
            raise ConfigError("max_new_tokens and top must be >= 1 and temperature >= 0, got "
                              f"{self.max_new_tokens}, {self.top} and {self.temperature:g}")


@dataclass
class TokenChange:
    token: str
    token_id: int
    p_before: float
    p_after: float
    change: float  # p_after - p_before


@dataclass
class Steered:
    """One scale: the continuation and the next-token changes at the prompt's last position."""

    scale: float
    text: str
    token_ids: list[int]
    increases: list[TokenChange]
    decreases: list[TokenChange]


@dataclass
class SteerResult:
    feature: int
    hook: str
    direction_norm: float  # |W_dec[feature]|
    activation_norm: float  # mean |activation| at the hook over the prompt's positions after BOS
    prompt: str
    prompt_ids: list[int]
    unsteered: str
    unsteered_ids: list[int]
    steered: list[Steered]
    curves: dict[str, list[float]] = field(default_factory=dict)  # token -> p(next) per scale in `curve_scales`
    curve_scales: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def feature_direction(sae: SAE, feature: int) -> torch.Tensor:
    """The feature's decoder row W_dec[feature] (d_out,), as stored (not normalised)."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise ConfigError(f"feature {feature} is out of range: this SAE has features 0..{sae.cfg.d_sae - 1}")
    return sae.W_dec[feature].detach()


def steering_splice(direction: torch.Tensor, scale: float) -> Splice:
    """act -> act + scale * direction at every position."""
    def add(act: torch.Tensor) -> torch.Tensor:
        return act + scale * direction.to(act.device, act.dtype)
    return add


def prompt_ids(lm: HookedLM, prompt: str, max_new_tokens: int) -> torch.Tensor:
    """(1, n) ids: BOS (as contexts are packed) and the prompt's tokens; the prompt and the
    continuation must fit the model's context."""
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give --prompt TEXT")
    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer; steer needs one to read the prompt")
    bos = [lm.bos_token_id] if lm.bos_token_id is not None else []
    ids = bos + lm.tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) + max_new_tokens > lm.context_length:
        raise DataError(f"the prompt is {len(ids)} tokens (with BOS) and --max-new-tokens {max_new_tokens} more need "
                        f"{len(ids) + max_new_tokens} positions; the model's context is {lm.context_length}")
    return torch.tensor([ids], dtype=torch.long, device=lm.device)


@torch.no_grad()
def generate(lm: HookedLM, ids: torch.Tensor, splices: dict[str, Splice], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """(new token ids, logits (d_vocab,) at the prompt's last position) with `splices` on.
    Greedy at temperature 0, else sampled from softmax(logits / temperature), seeded."""
    generator = torch.Generator().manual_seed(seed)
    seq, new, first = ids, [], None
    for _ in range(max_new_tokens):
        logits = lm.forward(seq, splices)[0, -1].float()
        first = logits if first is None else first
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
        new.append(nxt)
        seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
    return new, first


def probability_changes(before: torch.Tensor, after: torch.Tensor, tokenizer, top: int) -> tuple[list, list]:
    """(largest increases, largest decreases) of the next-token probability, as TokenChanges,
    from two logit vectors (softmax in float64)."""
    p0, p1 = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
    delta = p1 - p0
    top = min(top, delta.numel())

    def changes(ids: torch.Tensor) -> list[TokenChange]:
        return [TokenChange(_token(tokenizer, i), i, float(p0[i]), float(p1[i]), float(delta[i])) for i in ids.tolist()]
    return changes(delta.topk(top).indices), changes((-delta).topk(top).indices)


def _token(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id])) if tokenizer is not None else str(token_id)


def run_steer(lm: HookedLM, sae: SAE, cfg: SteerConfig, out_dir: str | Path | None = None) -> SteerResult:
    """Generate unsteered and at each scale, and the next-token changes; with `out_dir`, write
    steer.json and steer.png there."""
    hook = check_sae_fits(lm, sae)[1]
    direction = feature_direction(sae, cfg.feature)
    ids = prompt_ids(lm, cfg.prompt, cfg.max_new_tokens)
    act = lm.run_with_cache(ids, [hook])[hook][0, 1 if ids.shape[1] > 1 else 0:]
    base_ids, base_logits = generate(lm, ids, {}, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    steered, logits = [], {}
    for scale in cfg.scales:
        new, logits[scale] = generate(lm, ids, {hook: steering_splice(direction, scale)}, cfg.max_new_tokens,
                                      cfg.temperature, cfg.seed)
        up, down = probability_changes(base_logits, logits[scale], lm.tokenizer, cfg.top)
        steered.append(Steered(scale, lm.tokenizer.decode(new), new, up, down))
    result = SteerResult(cfg.feature, hook, float(direction.float().norm()), float(act.float().norm(dim=-1).mean()),
                         cfg.prompt, ids[0].tolist(), lm.tokenizer.decode(base_ids), base_ids, steered)
    _add_curves(result, base_logits, logits, lm.tokenizer, cfg.plot_tokens)
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "steer.json", result.to_dict())
        save_figure(steer_figure(result), out / "steer.png")
    return result


def _add_curves(result: SteerResult, base: torch.Tensor, logits: dict[float, torch.Tensor], tokenizer, n: int) -> None:
    """p(next token) against the scale (0 included) for the tokens promoted most at the scale
    of largest magnitude."""
    scales = sorted({0.0, *logits})
    probs = {s: torch.softmax((base if s == 0.0 and s not in logits else logits[s]).double(), -1) for s in scales}
    far = max(logits, key=abs)
    ids = (probs[far] - torch.softmax(base.double(), -1)).topk(min(n, base.numel())).indices.tolist()
    result.curve_scales = scales
    result.curves = {_token(tokenizer, i): [float(probs[s][i]) for s in scales] for i in ids}


def steer_figure(result: SteerResult):
    """Probability of the most promoted next tokens against the steering scale."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for token, ps in result.curves.items():
        ax.plot(result.curve_scales, ps, marker="o", label=token)
    ax.set_xlabel(f"scale (x W_dec[{result.feature}], |W_dec| = {result.direction_norm:.3g})")
    ax.set_ylabel("p(next token) at the prompt's end")
    ax.set_title(f"steering feature {result.feature} at {result.hook}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


CHANGES = (Column("token"), Column("p_before", "p before", ".4f"), Column("p_after", "p after", ".4f"),
           Column("change", fmt="+.4f"))


def side_by_side(left: str, right: str, width: int = 48, titles: tuple[str, str] = ("", "")) -> str:
    """Two texts in two columns, each wrapped at `width` (newlines kept as line breaks)."""
    def lines(text: str) -> list[str]:
        return [w for line in text.split("\n") for w in (textwrap.wrap(line, width) or [""])]
    a, b = lines(left), lines(right)
    rows = [titles] + [("-" * width, "-" * width)] + [(a[i] if i < len(a) else "", b[i] if i < len(b) else "")
                                                       for i in range(max(len(a), len(b)))]
    return "\n".join(f"{x:<{width}} | {y}".rstrip() for x, y in rows)


def format_steer(result: SteerResult) -> str:
    """Per scale: the two texts side by side and the next-token changes."""
    head = (f"feature {result.feature} at {result.hook}: |W_dec| = {result.direction_norm:.4g}, mean |activation| "
            f"over the prompt = {result.activation_norm:.4g}\nprompt: {result.prompt!r}")
    blocks = [head]
    for s in result.steered:
        blocks.append(side_by_side(result.unsteered, s.text, titles=("unsteered", f"scale {s.scale:g}")))
        rows = [asdict(c) for c in s.increases] + [asdict(c) for c in s.decreases]
        blocks.append(f"next token at the prompt's end, scale {s.scale:g}: top {len(s.increases)} increases, "
                      f"then decreases\n" + format_rows(rows, CHANGES))
    return "\n\n".join(blocks)
