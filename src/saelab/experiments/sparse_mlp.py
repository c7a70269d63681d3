"""Sparse MLPs (seed 004): replace each MLP of a language model by a wide sparse one and ask
how much of the loss it keeps and whether its neurons are the original neurons.

Per layer L a transcoder reads `blocks.L.ln2.hook_normalized` (the MLP input) and predicts
`blocks.L.hook_mlp_out`. Trained with GroupTrainer on shuffled activation pairs kept in memory
(`live_batches(..., in_memory=True)`: one LM pass over the training contexts; the SAE sweep of
a layer shares the stream; resumes exactly). Then, on held-out text, every layer's SAEs are
evaluated together (shared clean and ablation passes):

    loss_recovered = (CE_zero - CE_sparse) / (CE_zero - CE_clean) = 1 - (CE_sparse - CE_clean) / (CE_zero - CE_clean)

with CE_zero the loss with that MLP's output zero-ablated (mean ablation also reported), and
for every sparse neuron i the best signed cosine of its encoder column W_enc[:, i] with any
original neuron's input weights W_in[:, j], and of its decoder row W_dec[i] with any W_out[j].
`*_chance` is the same statistic for random directions: the level a match must beat.

Run folder: config.json (this experiment's settings), layer<L>/ (a GroupTrainer run: its own
config.json, log, checkpoint, saes/<label>/), metrics.json (one row per layer and SAE, with
the `NeuronMatch` columns), neuron_cosines.json and .png, report.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json, write_text
from saelab.data.cache.shuffle import live_batches
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.data.provenance import Provenance
from saelab.errors import ConfigError
from saelab.evals.entry import MetricsEntry, recovered_column, write_metrics
from saelab.evals.metrics import max_cosine
from saelab.evals.reconstruction import Evaluation, evaluate_on_lm
from saelab.lm.arch import MLPWeights
from saelab.lm.hooked import HookedLM
from saelab.plots import save_figure
from saelab.sae import SAE
from saelab.sae.architectures import architecture
from saelab.tables import Column, format_rows
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.shard import TrainedSAE, TrainResult
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
    # rows whose MLP input has norm above this x the median: out of training and metrics, clean in
    # the splice (saelab.data.outliers); None: off
    outlier_multiple: float | None = DEFAULT_MULTIPLE
    source: str | None = None  # the training text's source spec, recorded with each SAE (None: not known)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_tokens < 1 or self.lm_batch_size < 1:
            raise ConfigError("steps, batch_tokens and lm_batch_size must be positive")
        self.outlier_multiple = OutlierRule(self.outlier_multiple).multiple

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


@dataclass
class NeuronMatch:
    """A sparse-MLP row's own columns: where the SAE sits, and how its alive neurons match the
    original MLP's (`cosine_summary` without the histograms, and `chance_cosines`)."""

    layer: int
    sae_path: str  # relative to the run folder
    hook_name: str
    hook_name_out: str
    summary: dict  # cosine_summary's means, medians and shares (its histograms are in `hists`)
    chance: dict[str, float]
    hists: dict = field(default_factory=dict)  # for neuron_cosines.json, not a metrics column

    def to_dict(self) -> dict:
        return {"layer": self.layer, "sae_path": self.sae_path, "hook_name": self.hook_name,
                "hook_name_out": self.hook_name_out, **self.summary, **self.chance}


# ---- the experiment -------------------------------------------------------------------------
def train_layer(lm: HookedLM, layer: int, train_tokens, cfg: SparseMLPConfig, run_dir: Path) -> TrainResult:
    """Train the sweep for one layer into `run_dir` (resuming what is there)."""
    hook_in, hook_out = mlp_hooks(layer)
    source = live_batches(lm, train_tokens, hook_in, cfg.batch_tokens, target=hook_out, seed=cfg.seed,
                          drop_bos=cfg.exclude_bos, forward_batch_size=cfg.lm_batch_size, in_memory=True)
    tcfg = TrainConfig(total_steps=cfg.steps, checkpoint_every=max(cfg.steps // 4, 1),
                       log_every=max(min(50, cfg.steps // 20), 1),
                       normalize_activations=cfg.normalize_activations, seed=cfg.seed,
                       outlier_multiple=cfg.outlier_multiple)
    text = Provenance(source=cfg.source, context_length=int(torch.as_tensor(train_tokens).shape[1]),
                      prepend_bos=True, exclude_bos=cfg.exclude_bos)
    trainer = GroupTrainer(cfg.specs(lm.d_model), lm.d_model, run_dir, tcfg, d_out=lm.d_model,
                           hook_name=hook_in, hook_name_out=hook_out, model_name=lm.name, provenance=text)
    return trainer.fit(source)


def run_sparse_mlp(lm: HookedLM, train_tokens, eval_tokens, out_dir: str | Path,
                   cfg: SparseMLPConfig | None = None, progress: bool | None = None) -> list[MetricsEntry]:
    """The whole experiment into `out_dir`; returns the metrics rows (per layer, per SAE)."""
    cfg, out = cfg or SparseMLPConfig(), Path(out_dir)
    layers = list(range(lm.n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad or not layers:
        raise ConfigError(f"layers must be in 0..{lm.n_layers - 1}, got {layers}")
    write_json(out / "config.json", {"experiment": "sparse_mlp", "model": lm.name, **asdict(cfg)})
    results = {layer: train_layer(lm, layer, train_tokens, cfg, out / f"layer{layer}") for layer in layers}
    mine = [t for result in results.values() for t in result.trained]
    evaluations = evaluate_on_lm(lm, [t.sae for t in mine], eval_tokens, batch_size=cfg.lm_batch_size,
                                 exclude_bos=cfg.exclude_bos, outliers=OutlierRule(cfg.outlier_multiple),
                                 progress=progress)
    by_sae = {id(t): ev for t, ev in zip(mine, evaluations)}
    rows = []
    for layer, result in results.items():
        chance = chance_cosines(lm.mlp_weights(layer), result.trained[0].sae.cfg.d_sae, cfg.seed)
        rows += result.collect(lambda ts, layer=layer, chance=chance:
                               [_row(lm, layer, t, by_sae[id(t)], chance) for t in ts])
    if results[layers[0]].writes:
        _write_outputs(out, rows, lm.name)
    return rows


def _write_outputs(out: Path, rows: list[MetricsEntry], model: str) -> None:
    """metrics.json, neuron_cosines.json and .png, report.md."""
    hists = {f"layer{row.extra[0].layer}/{row.name}": row.extra[0].hists for row in rows}
    write_metrics(out, rows)
    write_json(out / "neuron_cosines.json", hists)
    plot_cosine_histograms(hists, out / "neuron_cosines.png")
    write_text(out / "report.md", format_report(rows, model))


def _row(lm: HookedLM, layer: int, t: TrainedSAE, ev: Evaluation, chance: dict) -> MetricsEntry:
    """The row of one layer's SAE; neurons count as alive if they fired on the held-out tokens."""
    summary = cosine_summary(neuron_cosines(t.sae, lm.mlp_weights(layer)), ev.recon.density > 0)
    hists = {k: summary.pop(k) for k in list(summary) if "hist" in k}
    match = NeuronMatch(layer, f"layer{layer}/saes/{t.label}", t.sae.cfg.hook_name, t.sae.cfg.hook_name_out,
                        summary, chance, hists)
    return MetricsEntry(t.label, ev.recon, ev.downstream, spec=t.spec.to_dict(), extra=[match])


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


REPORT = (Column("layer"), Column("name", "SAE"), Column("l0", "L0", ".1f"), Column("fvu", "FVU", ".3f"),
          Column("dead"), Column("ce_clean", "CE clean", ".4f"), Column("ce_zero", "CE zero", ".4f"),
          Column("ce_sae", "CE sparse", ".4f"), recovered_column("loss_recovered", "loss rec."),
          recovered_column("loss_recovered_mean", "loss rec. (mean)"), Column("kl", "KL", ".4f"),
          Column("enc", "enc cos (chance)"), Column("dec", "dec cos (chance)"))


def format_report(rows: list[MetricsEntry], model: str = "") -> str:
    """Markdown: per layer and SAE, sparsity, reconstruction, loss recovered and neuron matches."""
    def versus(d: dict, key: str) -> str:
        return f"{d[f'{key}_cos_mean']:.3f} ({d[f'{key}_chance']:.3f})"

    flat = [row.to_dict() for row in rows]
    cells = [{**d, "enc": versus(d, "enc"), "dec": versus(d, "dec")} for d in flat]
    table = format_rows(cells, REPORT, style="markdown")
    return "\n".join([f"# Sparse MLPs{f' on {model}' if model else ''}", "",
                      "loss recovered = (CE_zero - CE_sparse) / (CE_zero - CE_clean); cosines are each alive "
                      "sparse neuron's best match among the original MLP neurons (chance: random directions).", "",
                      table]) + "\n"
