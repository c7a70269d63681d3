"""Is an SAE's reconstruction better than a random error of the same size? (seed 002)

Cosine similarity to the original activation says how close a reconstruction is, but not
whether the error lies in directions the model cares about. So, per token, we build random
perturbations x' of the activation x with a chosen cosine to x and the same norm as the SAE's
output, splice them in, and compare the downstream CE / KL(clean || spliced) with the SAE's:

    x' = n * (c * u + sqrt(1 - c^2) * r),   u = x / |x|,  r a random unit vector orthogonal to u

with n = |x_hat| per token (or |x| with norm="input"). Variants:

    sae             the SAE's reconstruction x_hat
    random_matched  per token, c = cos(x, x_hat) and n = |x_hat|: the SAE's error, made random
    random          each fixed c in `cos_targets`: the curve KL(c)

A transcoder's "activation" is its output hook (the MLP output it replaces). Positions the
outlier rule flags (massive activations, saelab.data.outliers; an SAE's own recorded rule, else
the config's, judged on the SAE's input or, for a curve with no SAE, on the hook itself) keep
their clean activation in every variant, as in the loss-recovered splice; `outliers_kept` counts
them per row (the cosines and norm ratios are those of the perturbations drawn).

Across hooks (seed 002 compares the residual stream, attention and MLP outputs of early layers,
where robustness differs a lot: GPT-2's layer-0 attention output is far less robust than the
rest): `hook_perturbations` draws the curve keeping the activation's norm (|x'| = |x|) at every
hook asked for, with no SAE needed, and puts each given SAE's point on the panel of the hook it
replaces, with (norm="sae") a curve at the SAE's output norm beside it. All variants of all
hooks share one clean pass per batch, and each curve draws from its own seeded generators, so a
hook's numbers are the same whichever other hooks run beside it.

Output: perturb.json, table.md and kl_vs_cos.png (KL, log scale, against cosine; one panel per
hook); the tables and figures are experiments/perturb_views.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch

from saelab.atomic import write_json, write_text
from saelab.errors import ConfigError, DataError
from saelab.data.outliers import OutlierRule
from saelab.data.provenance import rule_for
from saelab.evals.downstream import KeepFlagged, compare_splices, sae_splices
from saelab.experiments.perturb_views import format_hook_table, format_table, plot_hooks, plot_kl_vs_cos
from saelab.lm.hook_names import expand_hooks
from saelab.lm.hooked import HookedLM, Splice
from saelab.lm.resolve import check_sae_fits
from saelab.sae import SAE

NORMS = ("sae", "input")


@dataclass
class PerturbConfig:
    cos_targets: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99])
    norm: str = "sae"  # |x'| = |x_hat| ("sae") or |x| ("input") for the fixed-cosine curve
    batch_size: int = 16
    exclude_bos: bool = True
    seed: int = 0
    outliers: OutlierRule | None = None  # flagged positions keep their clean activation; None: the SAE's rule

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        bad = [c for c in self.cos_targets if not -1.0 <= c <= 1.0]
        if bad:
            raise ConfigError(f"cosine targets must lie in [-1, 1]; got {bad}")


def perturb_at_cosine(x: torch.Tensor, cos, norm, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random x' (..., d) with cos(x, x') = cos and |x'| = norm for every token.

    x (..., d); cos and norm: floats or (...,) tensors. Computed in float64, returned in x's
    dtype. A zero x has no direction: its x' points along a random unit vector."""
    d = x.shape[-1]
    c = torch.as_tensor(cos, dtype=torch.float64, device=x.device)
    if bool(((c < -1) | (c > 1)).any()):
        raise ConfigError("cosine targets must lie in [-1, 1]")
    if d < 2 and bool((c.abs() < 1).any()):
        raise ConfigError("a 1-dimensional activation has no direction orthogonal to it")
    x64 = x.detach().to(torch.float64)
    g = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    length = x64.norm(dim=-1, keepdim=True)
    u = torch.where(length > 0, x64 / length.clamp_min(1e-300), g / g.norm(dim=-1, keepdim=True))
    h = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    r = h - (h * u).sum(-1, keepdim=True) * u
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    c = c.unsqueeze(-1) if c.dim() else c
    n = torch.as_tensor(norm, dtype=torch.float64, device=x.device)
    n = n.unsqueeze(-1) if n.dim() else n
    return (n * (c * u + (1 - c * c).clamp_min(0).sqrt() * r)).to(x.dtype)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


class _Meter:
    """Mean cos(x, x') and |x'| / |x| over the tokens a combine function sees."""

    def __init__(self, skip_first: bool):
        self.start, self.cos, self.ratio, self.n = int(skip_first), 0.0, 0.0, 0

    def __call__(self, act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        a, b = act[:, self.start:], new[:, self.start:]
        self.cos += _cos(a, b).sum().item()
        self.ratio += (b.double().norm(dim=-1) / a.double().norm(dim=-1).clamp_min(1e-30)).sum().item()
        self.n += a.shape[0] * a.shape[1]
        return new

    def result(self) -> dict:
        return {"cos": self.cos / max(self.n, 1), "norm_ratio": self.ratio / max(self.n, 1)}


class _Variant(NamedTuple):
    row: dict  # hook, sae, variant, cos_target
    splices: dict[str, Splice]
    meter: _Meter
    keep: KeepFlagged | None  # counts the positions kept clean


def _keep(cfg: PerturbConfig, sae: SAE | None) -> KeepFlagged | None:
    """The outlier rule's keeper for one variant: the SAE's recorded rule unless the config
    gives one (a curve with no SAE: the config's, else the default)."""
    rule = rule_for(sae, cfg.outliers) if sae is not None else (cfg.outliers or OutlierRule())
    return KeepFlagged(rule, int(cfg.exclude_bos)) if rule.enabled else None


def _variant(row: dict, cfg: PerturbConfig, make, sae: SAE | None) -> _Variant:
    """A variant whose splice output `make(meter, keep)` builds, metered."""
    meter, keep = _Meter(cfg.exclude_bos), _keep(cfg, sae)
    return _Variant(row, make(meter, keep), meter, keep)


def _sae_points(lm: HookedLM, hook: str, label: str, sae: SAE, cfg: PerturbConfig) -> list[_Variant]:
    """The SAE's reconstruction, and a random error with its cosine and norm, token by token."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def matched(act, x_hat):
        return perturb_at_cosine(act, _cos(act, x_hat), x_hat.double().norm(dim=-1), gen)

    return [_variant({"hook": hook, "sae": label, "variant": name, "cos_target": None}, cfg,
                     lambda m, keep, f=combine: sae_splices(lm, sae, lambda act, x_hat: m(act, f(act, x_hat)), keep=keep),
                     sae)
            for name, combine in (("sae", lambda act, x_hat: x_hat), ("random_matched", matched))]


def _curve(lm: HookedLM, hook: str, label: str | None, sae: SAE | None, cfg: PerturbConfig) -> list[_Variant]:
    """Random perturbations at each fixed cosine: |x'| = |x_hat| of `sae` (norm "sae"), or |x|
    when no SAE sets it. Target i draws from a generator seeded seed + 1 + i, so a curve does
    not depend on which other hooks or SAEs run beside it."""
    out = []
    for i, c in enumerate(cfg.cos_targets):
        g = torch.Generator().manual_seed(cfg.seed + 1 + i)
        row = {"hook": hook, "sae": label, "variant": "random", "cos_target": c}
        if sae is None:
            def make(m, keep, c=c, g=g):
                def splice(act):
                    new = m(act, perturb_at_cosine(act, c, act.double().norm(dim=-1), g))
                    return new if keep is None else keep(act, act, new)
                return {hook: splice}
        else:
            def make(m, keep, c=c, g=g):
                return sae_splices(lm, sae, lambda act, x_hat: m(act, perturb_at_cosine(
                    act, c, x_hat.double().norm(dim=-1), g)), keep=keep)
        out.append(_variant(row, cfg, make, sae))
    return out


def _variants(lm: HookedLM, hooks: list[str], asked: set[str], saes: Mapping[str, SAE],
              cfg: PerturbConfig) -> list[_Variant]:
    """Per hook: each SAE replacing it (its point and matched random), then its curves: the one
    keeping the activation's norm where the hook was asked for, has no SAE, or norm is "input"
    (the same for every SAE there), and with norm "sae" one at each SAE's output norm."""
    at = {hook: [(label, sae) for label, sae in saes.items() if check_sae_fits(lm, sae)[1] == hook]
          for hook in hooks}
    out = []
    for hook in hooks:
        for label, sae in at[hook]:
            out += _sae_points(lm, hook, label, sae, cfg)
        own = at[hook] if cfg.norm == "sae" else []
        for label, sae in ([(None, None)] if hook in asked or not own else []) + own:
            out += _curve(lm, hook, label, sae, cfg)
    return out


def _hook_order(lm: HookedLM, hooks: set[str], saes: Mapping[str, SAE]) -> list[str]:
    """The hooks asked for and those the SAEs replace, checked, in forward-pass order."""
    wanted = hooks | {check_sae_fits(lm, sae)[1] for sae in saes.values()}
    for hook in wanted:
        lm.hook_dim(hook)  # an unknown name: a ConfigError listing the valid ones
    if not wanted:
        raise ConfigError("nothing to perturb: give hooks, SAEs or both")
    return [name for name in lm.hook_names() if name in wanted]


def hook_perturbations(lm: HookedLM, tokens, hooks: Sequence[str] = (), saes: Mapping[str, SAE] | None = None,
                       cfg: PerturbConfig | None = None, progress: bool | None = None) -> dict:
    """The curve KL(cos) at every hook in `hooks` (names, or `layers` / `layers:0,1`) and at each
    SAE's replaced hook, with each SAE's point and matched random perturbation; every variant of
    every hook shares one clean pass per batch. `saes`: label -> SAE. Returns {"ce_clean",
    "n_tokens", "config", "hooks" (forward order), "saes": {label: hook}, "rows": [{hook, sae,
    variant, cos_target, cos, norm_ratio, ce, kl, ce_delta}]}; a row's `sae` names the SAE it
    belongs to (for a curve: whose output norm it keeps; None: |x'| = |x|). A hook asked for always
    has the curve keeping the activation's norm; one reached only through SAEs has it unless every
    SAE there draws its own (norm "sae"), as in the one-SAE table."""
    cfg, saes = cfg or PerturbConfig(), dict(saes or {})
    asked = set(expand_hooks(hooks, lm.n_layers))
    order = _hook_order(lm, asked, saes)
    variants = {str(i): v for i, v in enumerate(_variants(lm, order, asked, saes, cfg))}
    res = compare_splices(lm, tokens, {k: v.splices for k, v in variants.items()}, batch_size=cfg.batch_size,
                          exclude_bos=cfg.exclude_bos, progress=progress)
    clean = res["clean"]["ce"]
    rows = [{**v.row, **v.meter.result(), "ce": res[k]["ce"], "kl": res[k]["kl"], "ce_delta": res[k]["ce"] - clean,
             "outliers_kept": None if v.keep is None else v.keep.total} for k, v in variants.items()]
    config = {**asdict(cfg), "outliers": None if cfg.outliers is None else cfg.outliers.to_dict()}
    return {"ce_clean": clean, "n_tokens": res["clean"]["n_tokens"], "config": config, "hooks": order,
            "saes": {label: check_sae_fits(lm, sae)[1] for label, sae in saes.items()}, "rows": rows}


def perturbation_table(lm: HookedLM, sae: SAE, tokens, cfg: PerturbConfig | None = None,
                       progress: bool | None = None) -> dict:
    """One SAE at its own hook: {"ce_clean", "hook", "n_tokens", "config", "outlier_multiple",
    "outliers_kept", "rows": [{variant, cos_target, cos, norm_ratio, ce, kl, ce_delta}]}
    (`hook_perturbations` with that SAE alone)."""
    cfg = cfg or PerturbConfig()
    res = hook_perturbations(lm, tokens, saes={"sae": sae}, cfg=cfg, progress=progress)
    rows = [{k: v for k, v in r.items() if k not in ("hook", "sae")} for r in res["rows"]]
    kept = next(r["outliers_kept"] for r in res["rows"] if r["variant"] == "sae")
    return {"ce_clean": res["ce_clean"], "hook": res["hooks"][0], "n_tokens": res["n_tokens"],
            "outlier_multiple": rule_for(sae, cfg.outliers).multiple, "outliers_kept": kept,
            "config": {**res["config"], "outliers": rule_for(sae, cfg.outliers).to_dict()}, "rows": rows}


def _write(out: Path, result: dict, table: str, plot) -> None:
    write_json(out / "perturb.json", result)
    write_text(out / "table.md", table)
    plot(result, out / "kl_vs_cos.png")
    if not all(math.isfinite(r["kl"]) for r in result["rows"]):
        raise DataError(f"non-finite KL in {out / 'perturb.json'}: the SAE or model produced NaN/Inf")


def _check_tokens(tokens) -> None:
    if isinstance(tokens, torch.Tensor) and tokens.numel() == 0:
        raise DataError("no evaluation tokens")


def run_perturb(lm: HookedLM, sae: SAE, tokens, out_dir: str | Path,
                cfg: PerturbConfig | None = None, sae_path: str | None = None) -> dict:
    """One SAE into `out_dir`: perturb.json, table.md, kl_vs_cos.png."""
    _check_tokens(tokens)
    result = perturbation_table(lm, sae, tokens, cfg)
    result.update(sae=sae_path, model=lm.name)
    _write(Path(out_dir), result, format_table(result),
           lambda r, path: plot_kl_vs_cos(r, path, title=f"{r['hook']}: SAE vs random perturbations"))
    return result


def run_hook_perturb(lm: HookedLM, tokens, out_dir: str | Path, hooks: Sequence[str] = (),
                     saes: Mapping[str, SAE] | None = None, cfg: PerturbConfig | None = None,
                     sae_paths: Mapping[str, str] | None = None) -> dict:
    """Many hooks (and SAEs) into `out_dir`: perturb.json (`hook_perturbations` plus the model
    and the SAEs' folders), table.md (the summary, then every variant) and kl_vs_cos.png (a
    panel per hook)."""
    _check_tokens(tokens)
    result = hook_perturbations(lm, tokens, hooks, saes, cfg)
    result.update(model=lm.name, sae_paths=dict(sae_paths or {}))
    _write(Path(out_dir), result, format_hook_table(result, full=True), plot_hooks)
    return result
