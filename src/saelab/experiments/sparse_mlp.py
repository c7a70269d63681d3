"""Sparse MLPs (seed 004): replace each MLP of a language model by a wide sparse one and ask
how much of the loss it keeps and whether its neurons are the original neurons.

Per layer L a transcoder reads `blocks.L.ln2.hook_normalized` (the MLP input) and predicts
`blocks.L.hook_mlp_out`. Trained with GroupTrainer on in-memory activation pairs (one LM pass
per context batch; the SAE sweep of a layer shares the stream). Then, on held-out text:

    loss_recovered = (CE_zero - CE_sparse) / (CE_zero - CE_clean) = 1 - (CE_sparse - CE_clean) / (CE_zero - CE_clean)

with CE_zero the loss with that MLP's output zero-ablated (mean ablation also reported), and
for every sparse neuron i the best signed cosine of its encoder column W_enc[:, i] with any
original neuron's input weights W_in[:, j], and of its decoder row W_dec[i] with any W_out[j].
`*_chance` is the same statistic for random directions: the level a match must beat.

Run folder: layer<L>/ (GroupTrainer run: saes/<label>/, log, checkpoint, metrics.json),
metrics.json (one entry per layer and SAE), neuron_cosines.json and .png, report.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from saelab.atomic import write_json, write_text
from saelab.evals.downstream import evaluate_downstream, token_batches
from saelab.errors import ConfigError, DataError
from saelab.lm.arch import MLPWeights
from saelab.lm.hooked import HookedLM
from saelab.evals.metrics import feature_density, max_cosine
from saelab.plots import save_figure
from saelab.sae import SAE
from saelab.sae.architectures import architecture
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.spec import TrainSpec

HIST_EDGES = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)


@dataclass
class SparseMLPConfig:
    layers: list[int] | None = None  # None: every layer
    arch: str = "topk"
    d_sae: int | None = None  # None: expansion * d_model
    expansion: float = 32.0
    k: list[int] = field(default_factory=lambda: [32])  # topk / batchtopk sweep
    l1: list[float] = field(default_factory=lambda: [3.0])  # relu / jumprelu sweep
    lr: float = 1e-3
    steps: int = 2000
    batch_tokens: int = 1024
    normalize_activations: bool = True
    exclude_bos: bool = True  # BOS position out of training data, averages and splices
    lm_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_tokens < 1 or self.lm_batch_size < 1:
            raise ConfigError("steps, batch_tokens and lm_batch_size must be positive")

    def specs(self, d_model: int) -> list[TrainSpec]:
        width = self.d_sae or int(round(self.expansion * d_model))
        common = dict(arch=self.arch, d_sae=width, lr=self.lr, warmup_steps=min(100, self.steps // 10),
                      dead_tokens=max(self.batch_tokens * self.steps // 4, 1), b_dec_init="zeros")
        arch = architecture(self.arch)
        if arch.knob == "k":
            return [TrainSpec(k=k, **common) for k in self.k]
        norm = {"decoder_norm": "unit"} if "decoder_norm" in arch.settings else {}  # unit rows where it applies
        return [TrainSpec(coefficient=c, coefficient_warmup_steps=self.steps // 10, **norm, **common) for c in self.l1]


def mlp_hooks(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


# ---- data -----------------------------------------------------------------------------------
@torch.no_grad()
def collect_activations(lm: HookedLM, tokens, hooks: Sequence[str], *, batch_size: int = 16,
                        exclude_bos: bool = True) -> dict[str, torch.Tensor]:
    """{hook: (N, d) float32 on CPU}: every position of every context (position 0 dropped with
    `exclude_bos`), rows aligned across hooks; one early-stopping LM pass per batch."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for batch in token_batches(tokens, batch_size):
        cache = lm.run_with_cache(batch, list(hooks))
        for h in hooks:
            act = cache[h][:, 1:] if exclude_bos else cache[h]
            parts[h].append(act.reshape(-1, act.shape[-1]).float().cpu())
    return {h: torch.cat(p) for h, p in parts.items()}


class PairBatches:
    """Shuffled (x, y) row batches, endlessly: epoch e is a permutation seeded by (seed, e), so
    `iter_from(step)` resumes exactly where a run stopped (GroupTrainer uses it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if x.shape[0] < batch_size:
            raise DataError(f"{x.shape[0]} activation rows are fewer than one batch of {batch_size}; "
                            "use more training contexts or a smaller batch")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.per_epoch = x.shape[0] // batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def iter_from(self, step: int):
        epoch, offset = divmod(step, self.per_epoch)
        while True:
            order = self._order(epoch)
            for i in range(offset, self.per_epoch):
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self.x[idx], self.y[idx]
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        return self.iter_from(0)


# ---- neuron matching ------------------------------------------------------------------------
@torch.no_grad()
def neuron_cosines(sae: SAE, weights: MLPWeights) -> dict[str, torch.Tensor]:
    """Per sparse neuron (d_sae,): "enc" = max_j cos(W_enc[:, i], W_in[:, j]), "dec" =
    max_j cos(W_dec[i], W_out[j]) (signed; the original MLP has d_mlp neurons j)."""
    w_in, w_out = weights.W_in.detach().float().cpu(), weights.W_out.detach().float().cpu()
    if sae.W_enc.shape[0] != w_in.shape[0] or sae.W_dec.shape[1] != w_out.shape[1]:
        raise ConfigError(f"sparse MLP maps {sae.W_enc.shape[0]} -> {sae.W_dec.shape[1]} but the MLP "
                          f"maps {w_in.shape[0]} -> {w_out.shape[1]}")
    return {"enc": max_cosine(w_in.T, sae.W_enc.detach().float().cpu().T),
            "dec": max_cosine(w_out, sae.W_dec.detach().float().cpu())}


def chance_cosines(weights: MLPWeights, n: int, seed: int = 0) -> dict[str, float]:
    """Mean best cosine of n random Gaussian directions with the MLP's W_in columns / W_out rows."""
    gen = torch.Generator().manual_seed(seed)
    d_model = weights.W_in.shape[0]
    return {f"{k}_chance": max_cosine(w, torch.randn(n, d_model, generator=gen)).mean().item()
            for k, w in (("enc", weights.W_in.detach().float().cpu().T), ("dec", weights.W_out.detach().float().cpu()))}


def cosine_summary(cos: dict[str, torch.Tensor], alive: torch.Tensor) -> dict:
    """Means, share above 0.9, and histograms over the alive neurons (all if none is alive)."""
    mask = alive if bool(alive.any()) else torch.ones_like(alive)
    out: dict = {"n_alive": int(alive.sum())}
    for k, v in cos.items():
        v = v[mask].double()
        out[f"{k}_cos_mean"], out[f"{k}_cos_median"] = v.mean().item(), v.median().item()
        out[f"{k}_cos_frac_above_0.9"] = (v > 0.9).double().mean().item()
        out[f"{k}_hist_counts"] = torch.histogram(v.clamp(-1, 1), bins=HIST_EDGES)[0].round().long().tolist()
    out["hist_edges"] = HIST_EDGES.tolist()
    return out


# ---- the experiment -------------------------------------------------------------------------
def train_layer(lm: HookedLM, layer: int, train_tokens, eval_tokens, cfg: SparseMLPConfig,
                run_dir: Path) -> tuple[list[SAE], list[dict], dict[str, torch.Tensor]]:
    """Train the sweep for one layer; returns (SAEs on raw activations, their reconstruction
    metrics from held-out pairs, the held-out pairs {"x", "y"})."""
    hook_in, hook_out = mlp_hooks(layer)
    opts = dict(batch_size=cfg.lm_batch_size, exclude_bos=cfg.exclude_bos)
    train = collect_activations(lm, train_tokens, [hook_in, hook_out], **opts)
    held = collect_activations(lm, eval_tokens, [hook_in, hook_out], **opts)
    source = PairBatches(train[hook_in], train[hook_out], cfg.batch_tokens, cfg.seed)
    eval_pairs = list(zip(held[hook_in].split(4096), held[hook_out].split(4096)))
    tcfg = TrainConfig(total_steps=cfg.steps, checkpoint_every=max(cfg.steps // 4, 1),
                       log_every=max(min(50, cfg.steps // 20), 1),
                       normalize_activations=cfg.normalize_activations, seed=cfg.seed)
    trainer = GroupTrainer(cfg.specs(lm.d_model), lm.d_model, run_dir, tcfg, d_out=lm.d_model,
                           hook_name=hook_in, hook_name_out=hook_out, model_name=lm.name)
    trainer.fit(source, eval_batches=eval_pairs)
    recon = json.loads((run_dir / "metrics.json").read_text())
    return trainer.final_saes(), recon, {"x": held[hook_in], "y": held[hook_out]}


def run_sparse_mlp(lm: HookedLM, train_tokens, eval_tokens, out_dir: str | Path,
                   cfg: SparseMLPConfig | None = None, progress: bool | None = None) -> list[dict]:
    """The whole experiment into `out_dir`; returns the metrics.json entries."""
    cfg, out = cfg or SparseMLPConfig(), Path(out_dir)
    layers = list(range(lm.n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad or not layers:
        raise ConfigError(f"layers must be in 0..{lm.n_layers - 1}, got {layers}")
    write_json(out / "config.json", {"experiment": "sparse_mlp", "model": lm.name, **asdict(cfg)})
    all_saes, entries, hists = [], [], {}
    for layer in layers:
        saes, recon, held = train_layer(lm, layer, train_tokens, eval_tokens, cfg, out / f"layer{layer}")
        weights = lm.mlp_weights(layer)
        chance = chance_cosines(weights, saes[0].cfg.d_sae, cfg.seed)
        for sae, rec in zip(saes, recon):
            with torch.no_grad():
                alive = feature_density(sae.encode(held["x"])) > 0
            summary = cosine_summary(neuron_cosines(sae, weights), alive)
            label = f"layer{layer}/{rec['name']}"
            hists[label] = {k: summary.pop(k) for k in list(summary) if "hist" in k}
            entries.append({"layer": layer, "name": rec["name"], "sae_path": f"layer{layer}/saes/{rec['name']}",
                            "hook_name": sae.cfg.hook_name, "hook_name_out": sae.cfg.hook_name_out,
                            **{k: v for k, v in rec.items() if k != "name"}, **summary, **chance})
            all_saes.append(sae)
    down = evaluate_downstream(lm, all_saes, eval_tokens, batch_size=cfg.lm_batch_size,
                               exclude_bos=cfg.exclude_bos, progress=progress)
    for entry, d in zip(entries, down):
        entry.update(d)
    write_json(out / "metrics.json", entries)
    write_json(out / "neuron_cosines.json", hists)
    plot_cosine_histograms(hists, out / "neuron_cosines.png")
    write_text(out / "report.md", format_report(entries, lm.name))
    return entries


def plot_cosine_histograms(hists: dict[str, dict], path: str | Path) -> Path:
    """One row per SAE: histograms of encoder-vs-W_in and decoder-vs-W_out best cosines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.4 * max(len(hists), 1)))
    axes = fig.subplots(max(len(hists), 1), 2, squeeze=False)
    for row, (label, h) in zip(axes, hists.items()):
        edges = h["hist_edges"]
        for ax, key, what in zip(row, ("enc", "dec"), ("encoder vs MLP W_in", "decoder vs MLP W_out")):
            ax.stairs(h[f"{key}_hist_counts"], edges, fill=True, alpha=0.7)
            ax.set_title(f"{label}: {what}", fontsize=9)
            ax.set_xlabel("best cosine with an original neuron")
            ax.set_ylabel("sparse neurons")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def format_report(entries: list[dict], model: str = "") -> str:
    """Markdown: per layer and SAE, sparsity, reconstruction, loss recovered and neuron matches."""
    def f(v, spec=".3f"):
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [f"# Sparse MLPs{f' on {model}' if model else ''}", "",
             "loss recovered = (CE_zero - CE_sparse) / (CE_zero - CE_clean); cosines are each alive "
             "sparse neuron's best match among the original MLP neurons (chance: random directions).", "",
             "| layer | SAE | L0 | FVU | dead | CE clean | CE zero | CE sparse | loss rec. | loss rec. (mean) | KL "
             "| enc cos (chance) | dec cos (chance) |", "|" + "---|" * 13]
    for e in entries:
        lines.append(
            f"| {e['layer']} | {e['name']} | {f(e.get('l0'), '.1f')} | {f(e['fvu'])} | {e.get('dead')} | "
            f"{f(e['ce_clean'], '.4f')} | {f(e['ce_zero'], '.4f')} | {f(e['ce_sae'], '.4f')} | "
            f"{f(e['loss_recovered'])} | {f(e['loss_recovered_mean'])} | {f(e['kl'], '.4f')} | "
            f"{f(e['enc_cos_mean'])} ({f(e['enc_chance'])}) | {f(e['dec_cos_mean'])} ({f(e['dec_chance'])}) |")
    return "\n".join(lines) + "\n"
