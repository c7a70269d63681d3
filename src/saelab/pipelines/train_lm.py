"""Train a sweep of SAEs (or sparse MLPs) on a language model's activations and evaluate them:
the job behind `saelab train` and `saelab quickstart`.

The whole job, resumable at every stage: tokenize the corpus -> cache activations at the hook
(one LM pass, shared by every SAE) -> train all SAEs together on shuffled batches ->
evaluate each (reconstruction, sparsity, CE loss recovered, KL) on held-out text. One outlier
rule (`outlier_multiple`, saelab.data.outliers) drops massive-activation rows from the
training batches, leaves them out of the reconstruction metrics (reported beside them) and
keeps them clean in the splice; each SAE records it with the text it was trained on
(source, context length, BOS: saelab.data.provenance). The run
folder holds config.json (the trainer's config with this sweep's settings under "pipeline"),
log.jsonl, checkpoints, saes/<label>/, the activation cache (cache/, unless `live` or `cache_dir`),
metrics.json (one row per SAE, with train_tokens and the stage timings), table.txt and the
L0 / loss-recovered and feature-density plots.

Under torchrun, rank 0 writes the cache, every rank trains and evaluates its share of the
SAEs (saelab.train.shard), and rank 0 writes the results; with `parallel="data"` every rank
trains every SAE on its share of each batch (saelab.train.data_parallel).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from saelab.atomic import write_text
from saelab.data.cache import cache_activations, cache_complete, live_batches, open_cache
from saelab.data.corpus import token_contexts
from saelab.data.outliers import DEFAULT_MULTIPLE, OutlierRule
from saelab.data.provenance import Provenance
from saelab.errors import ConfigError
from saelab.evals.entry import MetricsEntry, recovered_column, with_outlier_columns, write_metrics
from saelab.evals.reconstruction import evaluate_on_lm
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import check_sae_fits, fit_context_length, heldout_contexts, load_lm
from saelab.pipelines.recovery_curve import CURVE_FILE, RecoveryCurve, plot_recovery_curves
from saelab.pipelines.toy import ground_truth_recovery
from saelab.plots import density_histograms_figure, plot_l0_vs_loss_recovered, save_figure
from saelab.sae import SAE
from saelab.tables import format_rows
from saelab.train import GroupTrainer, TrainConfig
from saelab.train.shard import TrainedSAE, once
from saelab.train.spec import INITS, TrainSpec
from saelab.train.sweep import per_init

# CE increase (nats) and KL beside loss recovered: on a real model zero ablation is far worse
# than unigram, so a high loss recovered alone flatters an SAE
# fields added after runs were first written, with their defaults: config.json leaves them out at those
LATER_FIELDS = {"cache_dir": None, "inits": ["tied"], "reference": None, "curve_every": 0}

TABLE_COLUMNS = ("name", "l0", "mse", "fvu", "dead", "dense", "ce_delta", "kl", recovered_column("loss_recovered"),
                 recovered_column("loss_recovered_mean"))


@dataclass
class LMSweepConfig:
    """One `saelab train` job: the SAEs (`specs`), the model and hook they read, the text they
    train and are evaluated on, and how long they train."""

    specs: list[TrainSpec]
    model: str | None = None  # HF folder or hub name; None: the offline default LM
    hook: str | None = None  # None: the residual stream after the middle layer
    hook_out: str | None = None  # a transcoder's target hook (sparse MLP)
    source: str = "stdlib"
    context_length: int = 128
    train_contexts: int = 4096
    eval_contexts: int = 64
    batch_size: int = 4096
    steps: int = 500
    normalize_activations: bool = True
    cache_dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"  # where the LM runs and the SAEs train ("cuda", "cuda:1", "mps", ...)
    lm_dtype: str = "float32"  # the LM's parameter dtype ("bfloat16", "float16"); the SAEs train in float32
    live: bool = False  # batches straight from the LM (a mixing buffer, no disk cache)
    outlier_multiple: float | None = DEFAULT_MULTIPLE  # rows above this x the median norm are outliers (None: off)
    cache_dir: str | None = None  # the activation cache's folder (default: <run>/cache); runs of one
    # experiment that train on the same text at the same hook share one (saelab frontier)
    inits: list[str] = field(default_factory=lambda: ["tied"])  # decoder inits: more than "tied" trains
    # every spec once per init (saelab.train.sweep.per_init)
    reference: str | None = None  # an SAE folder at the same hook: its decoder is the reference
    # dictionary each SAE's MMCS is measured against during training (seed 001's init curves)
    curve_every: int = 0  # steps between those measurements (0: off; needs `reference`)
    parallel: str = "sweep"  # under torchrun: each rank trains whole SAEs ("sweep") or a share of every batch ("data")

    def __post_init__(self) -> None:
        self.outlier_multiple = OutlierRule(self.outlier_multiple).multiple  # checked; 0 reads as None
        for name in ("train_contexts", "eval_contexts", "batch_size", "steps"):  # counts: "0" is a typo, not a request
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.context_length < 2:
            raise ConfigError(f"context_length must be at least 2 (BOS and one token), got {self.context_length}")
        bad = [init for init in self.inits if init not in INITS]
        if not self.inits or bad:
            raise ConfigError(f"inits must be among {list(INITS)}, got {list(self.inits)}")
        if self.curve_every < 0:
            raise ConfigError(f"curve_every must be >= 0 (0: no curve), got {self.curve_every}")
        if self.curve_every and not self.reference:
            raise ConfigError("a recovery curve (curve_every > 0) needs a reference SAE to measure against")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["specs"] = [s.to_dict() for s in self.specs]
        return out

    def settings(self) -> dict:
        """What config.json records under "pipeline": every field but the specs (config.json
        holds those already), and the later fields (LATER_FIELDS) only when not at their
        default, so run folders written before they existed still resume. Checked on resume
        like the rest of the run's config. Not `parallel`: how ranks split the work leaves the
        run the same (a data-parallel run resumes under any rank count)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("specs", "parallel") and (k not in LATER_FIELDS or LATER_FIELDS[k] != v)}


@dataclass
class SweepColumns:
    """A sweep row's own columns: tokens each SAE trained on, the run's stage timings in
    seconds (cache_s or data_s, train_s, eval_s; the same for every SAE of the run) and, with an
    outlier rule, the rows it dropped from training (`train_outliers`)."""

    train_tokens: int
    timings: dict[str, float]
    train_outliers: int | None = None

    def to_dict(self) -> dict:
        out = {"train_tokens": self.train_tokens, "timings": dict(self.timings)}
        if self.train_outliers is not None:
            out["train_outliers"] = self.train_outliers
        return out


def table_columns(rows) -> tuple:
    """The table's columns: TABLE_COLUMNS, with the outlier columns when some row had outliers."""
    return with_outlier_columns(TABLE_COLUMNS, rows)


def middle_hook(lm: HookedLM) -> str:
    """blocks.L.hook_resid_post for the middle layer (layer 0 of a 2-layer model)."""
    return f"blocks.{max(0, (lm.n_layers - 1) // 2)}.hook_resid_post"


def run_lm_sweep(cfg: LMSweepConfig, run_dir: str | Path, lm: HookedLM | None = None) -> list[MetricsEntry]:
    """Run the sweep into `run_dir` (resuming what is there) on `lm`, else the model
    `cfg.model` names; returns the metrics rows of every SAE in spec order (on every rank)."""
    run_dir = Path(run_dir)
    device = rank_device(cfg.device)
    lm = lm or load_lm(cfg.model, device=device, dtype=cfg.lm_dtype)
    hook, length = _check_model(cfg, lm)
    reference = _reference_decoder(cfg, lm, hook)
    timings, start = {}, time.perf_counter()
    batches = _training_batches(cfg, lm, hook, length, run_dir)
    timings["data_s" if cfg.live else "cache_s"] = time.perf_counter() - start
    trainer = GroupTrainer(
        per_init(cfg.specs, cfg.inits, lm.hook_dim(hook)),
        lm.hook_dim(hook),
        run_dir,
        TrainConfig(total_steps=cfg.steps, checkpoint_every=max(1, cfg.steps // 5), log_every=10,
                    normalize_activations=cfg.normalize_activations, seed=cfg.seed, device=device,
                    outlier_multiple=cfg.outlier_multiple),
        d_out=lm.hook_dim(cfg.hook_out) if cfg.hook_out else None,
        hook_name=hook,
        hook_name_out=cfg.hook_out,
        model_name=lm.name,
        pipeline=cfg.settings(),
        provenance=Provenance(source=cfg.source, context_length=length, prepend_bos=True, exclude_bos=True),
        parallel=cfg.parallel,
    )
    curve = None
    if reference is not None and cfg.curve_every:
        curve = RecoveryCurve(trainer, lambda sae: ground_truth_recovery(sae, reference), cfg.curve_every,
                              run_dir / CURVE_FILE, reference=f"reference SAE ({Path(cfg.reference).name})").attach()
    start = time.perf_counter()
    result = trainer.fit(batches)
    timings["train_s"] = time.perf_counter() - start
    if curve is not None and result.writes:
        plot_recovery_curves(curve.to_dict(), run_dir / "recovery_curve.png",
                             title=f"{Path(lm.name).name} {hook}: MMCS against the reference SAE during training")
    start = time.perf_counter()
    held_out = heldout_contexts(lm, cfg.source, n_contexts=cfg.eval_contexts, context_length=length)
    rule = OutlierRule(cfg.outlier_multiple)
    rows = result.collect(lambda mine: _evaluate(lm, mine, held_out, device, rule))
    timings["eval_s"] = time.perf_counter() - start
    dropped = result.rows_dropped if rule.enabled else None
    for row in rows:
        row.extra.append(SweepColumns(result.rows_trained, timings, dropped))
    if result.writes:
        _write_outputs(run_dir, rows, lm, hook)
    return rows


def _check_model(cfg: LMSweepConfig, lm: HookedLM) -> tuple[str, int]:
    """(the hook SAEs read, the context length) after checking the model can serve the sweep."""
    hook = cfg.hook or middle_hook(lm)
    for name in [hook] + ([cfg.hook_out] if cfg.hook_out else []):
        lm.hook_dim(name)  # an unknown hook is a ConfigError listing the valid ones
    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer; saelab needs one to read text")
    return hook, fit_context_length(lm, cfg.context_length)


def _reference_decoder(cfg: LMSweepConfig, lm: HookedLM, hook: str):
    """The reference SAE's decoder rows (d_sae, d_in), after checking it reads this run's hook
    of this model; None without a reference."""
    if not cfg.reference:
        return None
    ref = SAE.load(cfg.reference)
    hook_in, _ = check_sae_fits(lm, ref)
    if hook_in != hook:
        raise ConfigError(f"the reference SAE {cfg.reference} reads {hook_in}, but this run trains on {hook}; "
                          f"give a reference SAE of {hook} (or --hook {hook_in})")
    return ref.W_dec.detach().float().cpu()


def _evaluate(lm: HookedLM, mine: list[TrainedSAE], held_out, device: str, rule: OutlierRule) -> list[MetricsEntry]:
    """This process's rows: each SAE evaluated on the LM (on the training device)."""
    evaluations = evaluate_on_lm(lm, [t.sae.to(device) for t in mine], held_out, outliers=rule)
    return [MetricsEntry(t.label, ev.recon, ev.downstream, spec=t.spec.to_dict()) for t, ev in zip(mine, evaluations)]


def _write_outputs(run_dir: Path, rows: list[MetricsEntry], lm: HookedLM, hook: str) -> None:
    """metrics.json, table.txt and the two plots (rank 0's job)."""
    write_metrics(run_dir, rows)
    d_in = lm.hook_dim(hook)
    series: dict[str, list] = {}
    for row in rows:
        series.setdefault(f"{row.spec['arch']} x{row.recon.d_sae // d_in}", []).append(
            (row.recon.l0, row.downstream.loss_recovered, TrainSpec.from_dict(row.spec).knob(), row.downstream.ce_delta))
    plot_l0_vs_loss_recovered(series, run_dir / "l0_vs_loss_recovered.png", title=f"{Path(lm.name).name} {hook}")
    save_figure(density_histograms_figure(rows), run_dir / "feature_density.png")
    write_text(run_dir / "table.txt", format_rows(rows, table_columns(rows)) + "\n")


def _training_batches(cfg: LMSweepConfig, lm: HookedLM, hook: str, length: int, run_dir: Path):
    """Shuffled training batches: from an activation cache in the run folder (written once,
    by rank 0 under torchrun), or with `live` straight from the LM (no disk; the same batches)."""
    def contexts():
        return token_contexts(cfg.source, lm.tokenizer, length, split="train", max_contexts=cfg.train_contexts,
                              seed=cfg.seed)
    if cfg.live:
        return live_batches(lm, contexts(), hook, cfg.batch_size, target=cfg.hook_out, seed=cfg.seed)
    hooks = [hook] + ([cfg.hook_out] if cfg.hook_out else [])
    meta = {"source": cfg.source, "split": "train"}
    folder = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    once(lambda: cache_activations(lm, contexts(), hooks, folder, dtype=cfg.cache_dtype, meta=meta),
         present=lambda: cache_complete(folder))
    cache = open_cache(folder, model=lm, hooks=hooks)
    return cache.batches(hook, cfg.batch_size, target=cfg.hook_out, seed=cfg.seed)


def rank_device(device: str) -> str:
    """Plain "cuda" under torchrun means this rank's own GPU (LOCAL_RANK), not all on GPU 0."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device

