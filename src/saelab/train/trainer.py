"""Training of one SAE inside a group: its optimiser, schedules, dead features and resampling.

Like dictionary_learning's trainers, each SAE of a sweep is one object with `update(step, x, y)`;
the group driver (`saelab.train.group`) feeds the same batch to all of them. All state that matters
for an exact resume is in `state_tensors()`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.evals import metrics
from saelab.sae.model import SAE
from saelab.train.host_memory import keep_freed_memory
from saelab.train.spec import TrainSpec


class SAETrainer:
    """Trains one SAE: Adam on `sae.loss` with the spec's lr and coefficient schedules, and the
    architecture's policies — unit-norm decoder rows (`unit_norm_decoder`), the aux-k loss over
    dead features (`uses_aux_k`), Anthropic resampling every `resample_every` steps (`resamples`).
    A feature is dead once it has not fired for `spec.dead_tokens` tokens."""

    stackable = True  # may train stacked with same-shaped SAEs (train.batched), which skips `update`

    def __init__(self, spec: TrainSpec, sae: SAE, total_steps: int, generator: torch.Generator):
        self.spec, self.sae, self.total_steps, self.generator = spec, sae, total_steps, generator
        if sae.W_enc.device.type == "cpu":
            keep_freed_memory()  # a step's large temporaries are reused, not page-faulted anew
        act = sae.activation
        if spec.resample_every and not act.resamples:
            raise ConfigError(f"resample_every={spec.resample_every}, but {sae.cfg.arch} SAEs do not resample dead "
                              "features; set resample_every=0 (aux-k architectures train dead features through aux_k)")
        kwargs = {"fused": True} if _fused_adam_ok(sae) else {}
        self.opt = torch.optim.Adam(sae.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2), **kwargs)
        # tokens since each feature last fired: dead features (aux-k, resampling) are read off it
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_enc.device)
        self.unit_norm = act.unit_norm_decoder(sae.cfg)
        # the first step whose loss was NaN or Inf (-1: none), counted from 1 as log.jsonl and
        # checkpoints count steps done; kept on the device, so no sync a step
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=sae.W_enc.device)
        self._loss = torch.compile(sae.loss) if spec.compile else sae.loss
        self._autocast = _AUTOCAST_DTYPES.get(spec.autocast)

    def nonfinite_step(self) -> int | None:
        """The first step (counted from 1) whose loss was NaN or Inf, or None (reading it waits
        for the device)."""
        step = int(self.first_nonfinite)
        return None if step < 0 else step

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.spec.dead_tokens

    def update(self, step: int, x: Tensor, y: Tensor, log: bool = True) -> dict | None:
        """One optimiser step on batch x (N, d_in) -> y (N, d_out); returns this step's log
        entry if `log` (measuring L0 and FVU costs passes over the batch), else None."""
        spec, sae = self.spec, self.sae
        lr, coefficient = spec.lr_at(step, self.total_steps), spec.coefficient_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.dead_mask() if sae.activation.uses_aux_k else None
        with torch.autocast(x.device.type, self._autocast, enabled=self._autocast is not None):
            out = self._loss(x, y, coefficient, dead, spec.aux_k, spec.aux_coefficient, measure_l0=log)
        new = ~torch.isfinite(out.loss.detach()) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(new, step + 1, self.first_nonfinite)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        rows = self._sync_gradients(x.shape[0])
        if self.unit_norm:
            sae.remove_parallel_decoder_grad()
        self.opt.step()
        if self.unit_norm:
            sae.normalize_decoder()
        with torch.no_grad():
            self._sync_buffers()
            fired = self._sync_fired(out.fired)
            self.since_fired = torch.where(fired, torch.zeros_like(self.since_fired), self.since_fired + rows)
        resampled = 0
        if spec.resample_every and (step + 1) % spec.resample_every == 0:
            resampled = self.resample(*self._whole_batch(x, y))
        if not log:
            return None
        parts = self._batch_means({"loss": out.loss.item(), "mse": out.mse.item(), "sparsity": out.sparsity.item(),
                                   "aux": out.aux.item(), "l0": out.l0.item()}, x.shape[0])
        variance = self._total_variance(y)
        return {
            **parts,
            "fvu": parts["mse"] / variance if variance > 0 else math.nan,  # undefined on a constant batch
            "dead": int(self.dead_mask().sum()),
            "lr": lr,
            "coefficient": coefficient,
            **({"resampled": resampled} if resampled else {}),
        }

    # ---- what a data-parallel trainer (saelab.train.data_parallel) reduces across ranks -----
    # Here, in one process, each is the identity on the whole batch.
    def _sync_gradients(self, rows: int) -> int:
        """Make the gradients those of the whole batch; returns its row count."""
        return rows

    def _sync_buffers(self) -> None:
        """Make the SAE's buffers (e.g. batchtopk's threshold) the same on every rank."""

    def _sync_fired(self, fired: Tensor) -> Tensor:
        """(d_sae,) bool: which features fired anywhere in the whole batch."""
        return fired

    def _whole_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The whole batch (resampling draws from it)."""
        return x, y

    def _batch_means(self, means: dict[str, float], rows: int) -> dict[str, float]:
        """Per-row means over this process's rows -> the same means over the whole batch."""
        return means

    def _total_variance(self, y: Tensor) -> float:
        """The whole batch's total variance of the target (the log's FVU divides by it)."""
        return metrics.total_variance(y)

    @torch.no_grad()
    def resample(self, x: Tensor, y: Tensor) -> int:
        """Anthropic-style resampling of dead features (Towards Monosemanticity, 2023).

        Each dead feature takes a batch input drawn with probability proportional to its squared
        reconstruction error: the decoder row becomes that target's direction (relative to b_dec)
        at the mean live decoder norm, the encoder column that input's direction at 0.2 x the mean
        live encoder norm, the encoder bias 0; their Adam moments restart."""
        sae, dead = self.sae, self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        err = (y - sae(x)).pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return 0
        pick = torch.multinomial(err / err.sum(), n_dead, replacement=True, generator=self.generator)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        dec_norm = sae.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
        inputs = x[pick] - (sae.b_dec if sae.cfg.apply_b_dec_to_input else 0)
        targets = y[pick] - sae.b_dec
        idx = dead.nonzero().squeeze(1)
        sae.W_dec[idx] = _unit(targets) * (1.0 if self.unit_norm else dec_norm)
        sae.W_enc[:, idx] = (_unit(inputs) * 0.2 * enc_norm).T
        sae.b_enc[idx] = 0.0
        for param, index in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
            for key in ("exp_avg", "exp_avg_sq"):
                state = self.opt.state.get(param, {})
                if key in state:
                    state[key][index] = 0.0
        self.since_fired[idx] = 0
        return n_dead

    # ---- checkpointing -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        out["since_fired"] = self.since_fired
        for i, param in enumerate(self.sae.parameters()):
            for key, value in self.opt.state.get(param, {}).items():
                out[f"adam.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.since_fired = tensors["since_fired"].to(self.since_fired)
        params = list(self.sae.parameters())
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, i, key = name.split(".", 2)
                param = params[int(i)]
                self.opt.state[param][key] = value.to(param.device) if key != "step" else value.cpu()


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16}  # TrainSpec.autocast -> the dtype products run in


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _fused_adam_ok(sae: SAE) -> bool:
    """Fused Adam (one kernel per step) exists for CPU and CUDA float tensors in recent torch."""
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=sae.W_enc.device))
        torch.optim.Adam([probe], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False
