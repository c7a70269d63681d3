"""Train a sweep of SAEs (or sparse MLPs) on a language model's activations and evaluate them.

The whole job, resumable at every stage: tokenize the corpus -> cache activations at the hook
(one LM pass, shared by every SAE) -> train all SAEs together on shuffled batches ->
evaluate each (reconstruction, sparsity, CE loss recovered, KL) on held-out text -> write
metrics.json, a table and the L0 / loss-recovered plot into the run folder.

Under torchrun, rank 0 writes the cache, every rank trains and evaluates its share of the
SAEs (see saelab.train.group), and rank 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from saelab.atomic import write_json, write_text
from saelab.data.cache import cache_activations, live_batches, open_cache
from saelab.data.corpus import token_contexts
from saelab.errors import ConfigError
from saelab.lm.hooked import HookedLM
from saelab.lm.resolve import heldout_contexts, load_lm
from saelab.evals.lm_eval import evaluate_on_lm
from saelab.plots import density_histograms_figure, plot_l0_vs_loss_recovered, save_figure
from saelab.tables import format_rows
from saelab.train import GroupTrainer, TrainConfig, rank_and_world
from saelab.train.spec import TrainSpec

TABLE_COLUMNS = ("name", "l0", "mse", "fvu", "dead", "dense", "loss_recovered", "loss_recovered_mean", "kl")


@dataclass
class LMSweepConfig:
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

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["specs"] = [s.to_dict() for s in self.specs]
        return out


def middle_hook(lm: HookedLM) -> str:
    """blocks.L.hook_resid_post for the middle layer (layer 0 of a 2-layer model)."""
    return f"blocks.{max(0, (lm.n_layers - 1) // 2)}.hook_resid_post"


def run_lm_sweep(cfg: LMSweepConfig, run_dir: str | Path, lm: HookedLM | None = None) -> list[dict]:
    run_dir = Path(run_dir)
    device = rank_device(cfg.device)
    lm = lm or load_lm(cfg.model, device=device)
    hook = cfg.hook or middle_hook(lm)
    hooks = [hook] + ([cfg.hook_out] if cfg.hook_out else [])
    for name in hooks:
        lm.hook_dim(name)  # an unknown hook is a ConfigError listing the valid ones
    length = min(cfg.context_length, lm.context_length)
    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer; saelab needs one to read text")
    timings = {}
    start = time.perf_counter()
    batches = _training_batches(cfg, lm, hook, hooks, length, run_dir)
    timings["data_s" if cfg.live else "cache_s"] = time.perf_counter() - start
    trainer = GroupTrainer(
        cfg.specs,
        lm.hook_dim(hook),
        run_dir,
        TrainConfig(total_steps=cfg.steps, checkpoint_every=max(1, cfg.steps // 5), log_every=10,
                    normalize_activations=cfg.normalize_activations, seed=cfg.seed, device=device),
        d_out=lm.hook_dim(cfg.hook_out) if cfg.hook_out else None,
        hook_name=hook,
        hook_name_out=cfg.hook_out,
        model_name=lm.name,
    )
    start = time.perf_counter()
    trainer.fit(batches)
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    held_out = heldout_contexts(lm, cfg.source, n_contexts=cfg.eval_contexts, context_length=length)
    local = evaluate_on_lm(lm, [sae.to(device) for sae in trainer.final_saes()], held_out)
    for entry, label, spec in zip(local, trainer.labels, trainer.specs):
        entry.update(name=label, spec=spec.to_dict(), train_tokens=cfg.steps * cfg.batch_size)
    merged = trainer.gather(dict(zip(trainer.labels, local)))
    entries = [merged[label] for label in trainer.all_labels]
    timings["eval_s"] = time.perf_counter() - start
    if trainer.rank != 0:
        return entries
    write_json(run_dir / "metrics.json", entries)
    write_json(run_dir / "sweep.json", {**cfg.to_dict(), "hook": hook, "model_name": lm.name, "timings": timings})
    series: dict[str, list] = {}
    for entry in entries:
        series.setdefault(f"{entry['spec']['arch']} x{entry['d_sae'] // lm.hook_dim(hook)}", []).append(
            (entry["l0"], entry["loss_recovered"], TrainSpec.from_dict(entry["spec"]).knob()))
    plot_l0_vs_loss_recovered(series, run_dir / "l0_vs_loss_recovered.png", title=f"{Path(lm.name).name} {hook}")
    save_figure(density_histograms_figure(entries), run_dir / "feature_density.png")
    write_text(run_dir / "table.txt", format_rows(entries, TABLE_COLUMNS) + "\n")
    return entries


def _training_batches(cfg: LMSweepConfig, lm: HookedLM, hook: str, hooks: list[str], length: int, run_dir: Path):
    """Shuffled training batches: from an activation cache in the run folder (written once,
    by rank 0 under torchrun), or with `live` straight from the LM (no disk; the same batches)."""
    rank, world = rank_and_world()
    contexts = None
    if cfg.live or rank == 0:
        contexts = token_contexts(cfg.source, lm.tokenizer, length, split="train", max_contexts=cfg.train_contexts, seed=cfg.seed)
    if cfg.live:
        return live_batches(lm, contexts, hook, cfg.batch_size, target=cfg.hook_out, seed=cfg.seed)
    if rank == 0:  # one rank writes the cache; the others read it once it is complete
        cache_activations(lm, contexts, hooks, run_dir / "cache", dtype=cfg.cache_dtype, meta={"source": cfg.source, "split": "train"})
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    cache = open_cache(run_dir / "cache", model=lm, hooks=hooks)
    return cache.batches(hook, cfg.batch_size, target=cfg.hook_out, seed=cfg.seed)


def rank_device(device: str) -> str:
    """Plain "cuda" under torchrun means this rank's own GPU (LOCAL_RANK), not all on GPU 0."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device

