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
outlier rule flags in the SAE's input (massive activations, saelab.data.outliers) keep their
clean activation in every variant, as in the loss-recovered splice; `outliers_kept` counts them
(the cosines and norm ratios are those of the activations spliced in). Output: a table
(perturb.json, table.md) and a plot of KL (log scale) against cosine, with the SAE's point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json, write_text
from saelab.errors import ConfigError, DataError
from saelab.data.outliers import OutlierRule
from saelab.data.provenance import rule_for
from saelab.evals.downstream import KeepFlagged, compare_splices, sae_splices
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits
from saelab.plots import save_figure
from saelab.sae import SAE
from saelab.tables import Column, format_rows

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


def _combines(cfg: PerturbConfig) -> dict[str, tuple[dict, callable]]:
    """name -> (row fields, combine(act, x_hat) -> new act) for every variant."""
    out = {"sae": ({"variant": "sae", "cos_target": None}, lambda act, x_hat: x_hat)}
    gen = torch.Generator().manual_seed(cfg.seed)
    out["random_matched"] = ({"variant": "random_matched", "cos_target": None},
                             lambda act, x_hat: perturb_at_cosine(act, _cos(act, x_hat), x_hat.double().norm(dim=-1), gen))
    for i, c in enumerate(cfg.cos_targets):
        g = torch.Generator().manual_seed(cfg.seed + 1 + i)

        def combine(act, x_hat, c=c, g=g):
            n = (x_hat if cfg.norm == "sae" else act).double().norm(dim=-1)
            return perturb_at_cosine(act, c, n, g)
        out[f"random@{c:g}"] = ({"variant": "random", "cos_target": c}, combine)
    return out


def perturbation_table(lm: HookedLM, sae: SAE, tokens, cfg: PerturbConfig | None = None,
                       progress: bool | None = None) -> dict:
    """{"ce_clean", "hook", "n_tokens", "outlier_multiple", "outliers_kept", "rows": [{variant,
    cos_target, cos, norm_ratio, ce, kl, ce_delta}]} over `tokens`, all variants sharing one
    clean pass per batch."""
    cfg = cfg or PerturbConfig()
    _, hook_out = check_sae_fits(lm, sae)
    rule = rule_for(sae, cfg.outliers)
    variants, meters, fields, keeps = {}, {}, {}, {}
    for name, (row, combine) in _combines(cfg).items():
        meter = _Meter(cfg.exclude_bos)
        keeps[name] = KeepFlagged(rule, int(cfg.exclude_bos)) if rule.enabled else None
        splices = sae_splices(lm, sae, combine, keep=keeps[name])
        splices[hook_out] = lambda act, fn=splices[hook_out], m=meter: m(act, fn(act))
        variants[name], meters[name], fields[name] = splices, meter, row
    res = compare_splices(lm, tokens, variants, batch_size=cfg.batch_size,
                          exclude_bos=cfg.exclude_bos, progress=progress)
    clean = res["clean"]["ce"]
    rows = [{**fields[k], **meters[k].result(), "ce": res[k]["ce"], "kl": res[k]["kl"],
             "ce_delta": res[k]["ce"] - clean} for k in variants]
    return {"ce_clean": clean, "hook": hook_out, "n_tokens": res["clean"]["n_tokens"],
            "outlier_multiple": rule.multiple, "outliers_kept": None if keeps["sae"] is None else keeps["sae"].total,
            "config": {**asdict(cfg), "outliers": rule.to_dict()}, "rows": rows}


TABLE = (Column("variant"), Column("cos_target", "cos target", "g"), Column("cos", fmt=".4f"),
         Column("norm_ratio", "norm ratio", ".3f"), Column("ce", "CE", ".4f"),
         Column("ce_delta", "CE - clean", "+.4f"), Column("kl", "KL", ".4g"))


def format_table(result: dict) -> str:
    """The clean CE, then a Markdown table of the rows."""
    head = f"Hook `{result['hook']}`, clean CE {result['ce_clean']:.4f} nats over {result['n_tokens']} tokens."
    if result.get("outliers_kept"):
        head += (f" {result['outliers_kept']} positions (norm above {result['outlier_multiple']:g}x the median) kept "
                 "their clean activation in every variant.")
    return f"{head}\n\n{format_rows(result['rows'], TABLE, style='markdown')}\n"


def plot_kl_vs_cos(result: dict, path: str | Path, title: str = "") -> Path:
    """KL (log scale) against cosine: the random curve, the SAE's point, the matched random."""
    from matplotlib.figure import Figure

    floor = 1e-9  # KL can be exactly 0 (cos 1 with the same norm); a log axis needs > 0
    rows = result["rows"]
    curve = sorted((r["cos"], max(r["kl"], floor)) for r in rows if r["variant"] == "random")
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    if curve:
        ax.plot(*zip(*curve), "o-", color="tab:gray", label="random, fixed cos")
    for variant, style, label in (("sae", "r*", "SAE"), ("random_matched", "bs", "random, SAE's cos & norm")):
        for r in rows:
            if r["variant"] == variant:
                ax.plot([r["cos"]], [max(r["kl"], floor)], style, markersize=11, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity to the original activation")
    ax.set_ylabel("KL(clean || spliced), nats / token")
    ax.set_title(title or result["hook"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run_perturb(lm: HookedLM, sae: SAE, tokens, out_dir: str | Path,
                cfg: PerturbConfig | None = None, sae_path: str | None = None) -> dict:
    """The experiment into `out_dir`: perturb.json, table.md, kl_vs_cos.png."""
    if isinstance(tokens, torch.Tensor) and tokens.numel() == 0:
        raise DataError("no evaluation tokens")
    out = Path(out_dir)
    result = perturbation_table(lm, sae, tokens, cfg)
    result.update(sae=sae_path, model=lm.name)
    write_json(out / "perturb.json", result)
    write_text(out / "table.md", format_table(result))
    plot_kl_vs_cos(result, out / "kl_vs_cos.png", title=f"{result['hook']}: SAE vs random perturbations")
    if not all(math.isfinite(r["kl"]) for r in result["rows"]):
        raise DataError(f"non-finite KL in {out / 'perturb.json'}: the SAE or model produced NaN/Inf")
    return result
