"""Same-shaped SAEs of a sweep trained as one stacked model: one batched product per step.

GroupTrainer already feeds every SAE of a sweep the same batch. SAEs that also share their shape,
architecture and optimiser settings (e.g. eight L1 coefficients at one width) go further here:
their weights are stacked, `W_enc (n, d_in, d_sae)`, `W_dec (n, d_sae, d_out)`, and one step is
one `baddbmm` / `bmm` (or, for topk, the batched sparse kernels of saelab.sae.sparse_kernels)
over the shared batch, with one Adam over the stacked tensors. Adam is elementwise, so that is
each SAE's own Adam; per-SAE things stay per SAE: the coefficient and its warm-up, the data
initialisation (done on each SAE before stacking), dead-feature counters and aux-k, the
decoder-norm constraint (row by row). What may differ inside a stack is `PER_SAE`; everything
else of the TrainSpec (lr schedule, betas, k, aux-k settings, dead_tokens...) is the stack's key.
Architectures say whether they stack (`Activation.stackable`: relu, topk); resampling SAEs, other
architectures and lone shapes train in the loop (`SAETrainer.update`).

The SAETrainers stay the record: `pull` stacks their weights, Adam moments and dead counters,
`push` writes them back (before checkpoints, the final SAEs and anything reading `group.saes`),
so checkpoints, resume and the saved SAE folders are the looped path's, byte for byte in format.
Results equal the loop's up to float rounding (the batched products sum in another order).
`stacking(False)` (or SAELAB_STACKED=0) turns stacking off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from saelab.evals import metrics
from saelab.sae.sparse_kernels import SparsePattern, sampled_pre_acts, sparse_decode, use_sparse
from saelab.train.trainer import SAETrainer, _fused_adam_ok

PER_SAE = ("coefficient", "coefficient_warmup_steps", "name", "init", "b_dec_init")
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_enabled = [os.environ.get("SAELAB_STACKED", "1") != "0"]


@contextlib.contextmanager
def stacking(enabled: bool):
    """Stack same-shaped SAEs (True, the default) or train every SAE in the loop (False)."""
    old, _enabled[0] = _enabled[0], enabled
    try:
        yield
    finally:
        _enabled[0] = old


def stack_key(trainer: SAETrainer) -> tuple | None:
    """What SAEs must share to train in one stack; None if this one cannot stack."""
    sae, spec = trainer.sae, trainer.spec
    if (not (trainer.stackable and sae.activation.stackable) or spec.resample_every or spec.autocast or spec.compile
            or list(sae.activation.parameters())):  # autocast and compile live in `update`, which a stack skips
        return None
    fields = {k: v for k, v in spec.to_dict().items() if k not in PER_SAE}
    return (repr(sorted(fields.items())), sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out,
            sae.cfg.apply_b_dec_to_input, str(sae.W_enc.device))


def plan(trainers: list[SAETrainer], rows: int | None = None) -> list[list[int]]:
    """The trainers' indices in groups: stacks of two or more, then each other trainer alone.
    Given the batch's `rows`, a stack on a CPU is cut so that one of its (n, rows, d_sae) float32
    blocks stays within MAX_CPU_STACK_BYTES (see there)."""
    groups: dict = {}
    for i, trainer in enumerate(trainers):
        key = stack_key(trainer) if _enabled[0] else None
        groups.setdefault(i if key is None else key, []).append(i)
    out = []
    for group in groups.values():
        size = _max_stack(trainers[group[0]], rows) if len(group) > 1 else 1
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out


# A stack's (n, rows, d_sae) float32 blocks (pre-activations, features, their gradients) are
# allocated and freed every step. On a CPU, glibc serves blocks above 2 GiB from fresh pages each
# time (saelab.train.host_memory), so a stack of 8 relu SAEs at d_sae 16384, batch 4096 (2 GiB
# blocks) ran at 0.58 of its products' roofline against 0.92 looped. Cut into stacks whose blocks
# stay within 1 GiB, they come from the heap, and the step holds a few such blocks at a time, not
# a few 2 GiB ones. GPUs keep freed blocks in their caching allocator: their stacks are not cut.
MAX_CPU_STACK_BYTES = 2**30


def _max_stack(trainer: SAETrainer, rows: int | None) -> int:
    """How many SAEs like this one a stack may hold for batches of `rows` (any number: no bound)."""
    if rows is None or trainer.sae.W_enc.device.type != "cpu":
        return 2**62
    return max(1, MAX_CPU_STACK_BYTES // (4 * rows * trainer.sae.cfg.d_sae))


class Stepper:
    """Steps a group's trainers: stacked where `plan` allows, else each trainer's `update`. The
    plan is made at the first batch, whose rows bound a CPU stack's size."""

    def __init__(self, trainers: list[SAETrainer]):
        self.trainers = trainers
        self.groups: list[list[int]] | None = None
        self.stacks: dict[int, StackedTrainer] = {}

    def _plan(self, rows: int) -> list[list[int]]:
        if self.groups is None:
            self.groups = plan(self.trainers, rows)
            self.stacks = {g[0]: StackedTrainer([self.trainers[i] for i in g]) for g in self.groups if len(g) > 1}
        return self.groups

    def update(self, step: int, x: Tensor, y: Tensor, log: bool) -> list[dict | None]:
        entries: list = [None] * len(self.trainers)
        for group in self._plan(x.shape[0]):
            if len(group) > 1:
                out = self.stacks[group[0]].update(step, x, y, log)
            else:
                out = [self.trainers[group[0]].update(step, x, y, log=log)]
            for i, entry in zip(group, out):
                entries[i] = entry
        return entries

    def push(self) -> None:
        """Write the stacks' state back into their trainers (weights, Adam, dead counters)."""
        for stack in self.stacks.values():
            stack.push()


class StackedTrainer:
    """n SAETrainers of one stack key, trained as stacked tensors (see the module docstring)."""

    def __init__(self, trainers: list[SAETrainer]):
        self.trainers, self.n = trainers, len(trainers)
        first = trainers[0]
        self.spec, self.cfg, self.act = first.spec, first.sae.cfg, first.sae.activation
        self.params = {name: torch.stack([getattr(t.sae, name).detach() for t in trainers]).requires_grad_()
                       for name in NAMES}
        kwargs = {"fused": True} if _fused_adam_ok(first.sae) else {}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=self.spec.lr,
                                    betas=(self.spec.beta1, self.spec.beta2), **kwargs)
        self.unit_norm = first.unit_norm
        self.pull()

    # ---- moving state between the stack and its trainers --------------------------------------
    @torch.no_grad()
    def pull(self) -> None:
        """Stack the trainers' weights, Adam moments and dead counters."""
        for name, param in self.params.items():
            param.copy_(torch.stack([getattr(t.sae, name) for t in self.trainers]))
            states = [t.opt.state.get(getattr(t.sae, name), {}) for t in self.trainers]
            if states[0]:
                self.opt.state[param] = {key: (states[0][key].clone() if key == "step" else
                                               torch.stack([s[key] for s in states])) for key in states[0]}
        self.since_fired = torch.stack([t.since_fired for t in self.trainers])

    @torch.no_grad()
    def push(self) -> None:
        for i, t in enumerate(self.trainers):
            for name, param in self.params.items():
                mine = getattr(t.sae, name)
                mine.copy_(param[i])
                state = self.opt.state.get(param, {})
                if state:
                    t.opt.state[mine] = {key: (v.clone() if key == "step" else v[i].clone()) for key, v in state.items()}
            t.since_fired = self.since_fired[i].clone()

    # ---- one step ------------------------------------------------------------------------------
    def update(self, step: int, x: Tensor, y: Tensor, log: bool) -> list[dict | None]:
        """One optimiser step of every SAE of the stack on x (N, d_in) -> y (N, d_out)."""
        lr = self.spec.lr_at(step, self.trainers[0].total_steps)  # the lr schedule is in the stack key
        coefficients = [t.spec.coefficient_at(step) for t in self.trainers]
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.since_fired >= self.spec.dead_tokens if self.act.uses_aux_k else None
        parts = self.loss(x, y, x.new_tensor(coefficients), dead, log)
        self._note_nonfinite(step, parts["loss"].detach())
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].sum().backward()
        W_dec = self.params["W_dec"]
        if self.unit_norm:
            _remove_parallel_grad(W_dec)
        self.opt.step()
        with torch.no_grad():
            if self.unit_norm:
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            self.since_fired = torch.where(parts["fired"], torch.zeros_like(self.since_fired), self.since_fired + x.shape[0])
        if not log:
            return [None] * self.n
        return self._entries(parts, y, lr, coefficients)

    def _note_nonfinite(self, step: int, losses: Tensor) -> None:
        """Each trainer's first non-finite step, as SAETrainer.update records it (on the device)."""
        bad = ~torch.isfinite(losses)
        for i, t in enumerate(self.trainers):
            t.first_nonfinite = torch.where(bad[i] & (t.first_nonfinite < 0), step + 1, t.first_nonfinite)

    def _entries(self, parts: dict, y: Tensor, lr: float, coefficients: list[float]) -> list[dict]:
        """The log entries SAETrainer.update writes, one per SAE."""
        values = {k: parts[k].detach().tolist() for k in ("loss", "mse", "sparsity", "aux", "l0")}
        dead = (self.since_fired >= self.spec.dead_tokens).sum(-1).tolist()
        variance = metrics.total_variance(y)
        return [{**{k: v[i] for k, v in values.items()}, "fvu": values["mse"][i] / variance, "dead": int(dead[i]),
                 "lr": lr, "coefficient": coefficients[i]} for i in range(self.n)]

    def encoder_bias(self) -> Tensor:
        """(n, d_sae): each SAE's SAE.encoder_bias."""
        p = self.params
        if not self.cfg.apply_b_dec_to_input:
            return p["b_enc"]
        return p["b_enc"] - torch.bmm(p["b_dec"][:, None, :], p["W_enc"])[:, 0]

    def loss(self, x: Tensor, y: Tensor, coefficients: Tensor, dead: Tensor | None, log: bool) -> dict:
        """Per-SAE loss parts (n,) each, `fired` (n, d_sae) and `l0` (n,) (zeros unless `log`)."""
        p, n = self.params, self.n
        sparse = self.act.sparse_kernels and use_sparse(self.act.k, self.cfg.d_sae)
        with torch.no_grad() if sparse else contextlib.nullcontext():
            z = torch.baddbmm(self.encoder_bias()[:, None, :], x.expand(n, *x.shape), p["W_enc"])
        b_dec = p["b_dec"] if self.cfg.apply_b_dec_to_input else None
        sampled = functools.partial(sampled_pre_acts, x, p["W_enc"], p["b_enc"], b_dec, z=z) if sparse else z_gather(z)
        if self.act.per_token_k:
            x_hat, sparsity, fired, l0 = self._sparse_code(z, sampled, x.shape[0])
        else:
            x_hat, sparsity, fired, l0 = self._dense_code(z, coefficients, log)
        err = y - x_hat
        mse = err.pow(2).sum(-1).mean(-1)
        aux = self._aux_k(z.detach(), sampled, err.detach(), dead)
        return {"loss": mse + sparsity + aux, "mse": mse, "sparsity": sparsity, "aux": aux, "fired": fired, "l0": l0}

    def _sparse_code(self, z: Tensor, sampled, n_tokens: int) -> tuple:
        """topk: the stacked pattern of every SAE's k features per token, decoded sparsely."""
        p = self.params
        pattern = self.act.select(z.detach())
        values = torch.relu(sampled(pattern))
        x_hat = sparse_decode(values, p["W_dec"], pattern).view(self.n, n_tokens, -1) + p["b_dec"][:, None, :]
        with torch.no_grad():
            active = values > 0
            fired = torch.bincount(pattern.global_cols[active], minlength=pattern.width).view(self.n, -1) > 0
            block = torch.div(pattern.rows[active], n_tokens, rounding_mode="floor")
            l0 = torch.bincount(block, minlength=self.n) / n_tokens
        return x_hat, z.new_zeros(self.n), fired, l0

    def _dense_code(self, z: Tensor, coefficients: Tensor, log: bool) -> tuple:
        """relu: f (n, N, d_sae), decoded by one baddbmm (the bias add fused into it); the penalty
        from f's column sums, as SAE._dense_step takes it (the sums also say which fired)."""
        p = self.params
        f = self.act.features(z, p["b_enc"][:, None, :])
        x_hat = torch.baddbmm(p["b_dec"][:, None, :], f, p["W_dec"])
        sums = f.sum(1)  # (n, d_sae)
        sparsity = z.new_zeros(self.n)
        if bool((coefficients != 0).any()):  # stacked architectures have a linear penalty
            sparsity = coefficients * self.act.penalty_from_sums(sums, p["W_dec"], f.shape[1])
        with torch.no_grad():  # f >= 0, so a feature fired iff its column sum is positive
            fired = sums.detach() > 0
            l0 = (f > 0).sum((1, 2)) / f.shape[1] if log else z.new_zeros(self.n)
        return x_hat, sparsity, fired, l0

    def _aux_k(self, z: Tensor, sampled, residual: Tensor, dead: Tensor | None) -> Tensor:
        """Each SAE's aux-k loss (architectures with `uses_aux_k`), as _KArch.aux_loss computes
        it: its top-min(aux_k, #dead) dead features per token reconstruct its residual."""
        n, n_tokens, d_sae = z.shape
        if dead is None or not bool(dead.any()):
            return z.new_zeros(n)
        aux_k = self.spec.aux_k or self.cfg.d_in // 2
        k = min(aux_k, int(dead.sum(-1).max()))
        top = torch.topk(torch.where(dead[:, None, :], z, torch.full_like(z, -torch.inf)), k, dim=-1, sorted=False)
        rows = torch.arange(n * n_tokens, device=z.device).view(n, n_tokens, 1)
        flat = (rows * d_sae + top.indices)[torch.isfinite(top.values)]  # an SAE with fewer dead keeps them all
        pattern = SparsePattern.from_flat(flat, n * n_tokens, d_sae, blocks=n)
        r_hat = sparse_decode(torch.relu(sampled(pattern)), self.params["W_dec"], pattern).view_as(residual)
        total = (residual - residual.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-12)
        aux = (residual - r_hat).pow(2).sum(-1).mean(-1) / total
        return self.spec.aux_coefficient * aux * dead.any(-1)


def z_gather(z: Tensor):
    """The dense path's `sampled`: a pattern's entries of z, differentiated through z."""
    return lambda pattern: pattern.gather(z)


@torch.no_grad()
def _remove_parallel_grad(W_dec: Tensor) -> None:
    """SAE.remove_parallel_decoder_grad for stacked rows (n, d_sae, d_out)."""
    if W_dec.grad is not None:
        w = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        W_dec.grad.sub_((W_dec.grad * w).sum(-1, keepdim=True) * w)
