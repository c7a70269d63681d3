"""Sparse products for k-sparse codes: decode, and both backward passes, from the active entries.

A k-sparse SAE step needs one dense product, the encoder's `z = x @ W_enc + bias` (N, d_sae), to
choose its active features. Everything else touches only the chosen entries, so it is done on a
`SparsePattern` (the chosen (row, column) pairs, row-major, in CSR form) rather than as a product
with a mostly-zero (N, d_sae) matrix:

    decode          x_hat = F @ W_dec                  embedding_bag over the pattern
    its backward    dF    = (g @ W_dec^T)[pattern]     sampled_addmm (an SDDMM)
                    dW_dec = F^T @ g                   the transposed pattern (CSR) @ g
    encoder backward dW_enc = x^T @ dZ, dZ sparse      the transposed pattern (CSR) @ x
                    db    = column sums of dZ          index_add

For topk at k 32, d_sae 16384 that replaces four of the five dense products of a step with work
proportional to N * k (the OpenAI and sparsify kernels do the same on GPU with Triton). Which
path runs is chosen once, here (`use_sparse`), by shape, with `kernel_mode` to force either one.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("auto", "sparse", "dense")
# measured on CPU (a topk step, d_in 256, batch 2048, k 32, 1 thread, dense time / sparse time):
# d_sae 64: 0.70, 128: 0.78, 256: 0.95, 512: 1.01, 2048: 1.34, 16384: 1.5 (bench/sparse_kernels.py).
# Below k / d_sae = 1/16 the sparse step wins; above it the per-entry work and the topk dominate.
CROSSOVER_DENSITY = 1 / 16
_mode = [os.environ.get("SAELAB_SPARSE_KERNELS", "auto")]


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Force the sparse ("sparse") or dense ("dense") training path inside the block ("auto":
    by shape). The environment variable SAELAB_SPARSE_KERNELS sets the default."""
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    old, _mode[0] = _mode[0], mode
    try:
        yield
    finally:
        _mode[0] = old


def use_sparse(k: float, d_sae: int) -> bool:
    """Whether a code with k active features per token (on average) of d_sae trains through the
    sparse kernels: forced by `kernel_mode`, else when k / d_sae is at most CROSSOVER_DENSITY."""
    mode = _mode[0]
    if mode not in MODES:
        raise ValueError(f"SAELAB_SPARSE_KERNELS must be one of {MODES}, got {mode!r}")
    return mode == "sparse" or (mode == "auto" and k <= CROSSOVER_DENSITY * d_sae)


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class SparsePattern:
    """The chosen entries of an (n_rows, n_cols) matrix, row by row with columns ascending in a
    row (CSR): `crow` (n_rows + 1,) row starts, `cols` (nnz,) columns. Built without gradients;
    the values on it are what is differentiated.

    `blocks` > 1 stacks that many SAEs of one shape (saelab.train.batched): rows are (SAE, token)
    pairs, n_rows = blocks * tokens, and SAE b's entries use its own block of the stacked weights,
    i.e. the global column `b * n_cols + col` of a (blocks * n_cols)-wide dictionary."""

    def __init__(self, crow: Tensor, cols: Tensor, n_cols: int, blocks: int = 1):
        self.crow, self.cols, self.n_cols, self.blocks = crow, cols, n_cols, blocks
        self.n_rows = crow.numel() - 1
        self.rows = torch.repeat_interleave(torch.arange(self.n_rows, device=cols.device), crow[1:] - crow[:-1])
        self.block_rows = self.n_rows // blocks
        self.global_cols = cols if blocks == 1 else cols + torch.div(self.rows, self.block_rows, rounding_mode="floor") * n_cols
        self._transposed = {}

    @classmethod
    def from_rows(cls, indices: Tensor, n_cols: int, blocks: int = 1) -> "SparsePattern":
        """From (..., N, k) column indices, k per row (any order within a row); leading
        dimensions (the stacked SAEs) flatten into `blocks`."""
        n, k = indices[..., 0].numel(), indices.shape[-1]
        cols = torch.sort(indices, dim=-1).values.reshape(-1)
        return cls(torch.arange(0, n * k + 1, k, device=indices.device), cols, n_cols, blocks)

    @classmethod
    def from_flat(cls, flat: Tensor, n_rows: int, n_cols: int, blocks: int = 1) -> "SparsePattern":
        """From positions in the flattened (n_rows, n_cols) matrix (any order, no repeats)."""
        flat = torch.sort(flat).values
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=flat.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
        return cls(crow, flat - rows * n_cols, n_cols, blocks)

    @property
    def width(self) -> int:
        """Columns of the stacked dictionary: blocks * n_cols."""
        return self.blocks * self.n_cols

    def gather(self, dense: Tensor) -> Tensor:
        """(nnz,) the entries of a dense (n_rows, n_cols) matrix (or (blocks, N, n_cols) stack)."""
        return dense.reshape(-1)[self.rows * self.n_cols + self.cols]

    def matmul(self, values: Tensor, W: Tensor) -> Tensor:
        """(n_rows, d) = S @ W for S the sparse matrix of `values` on this pattern, W (width, d)."""
        return F.embedding_bag(self.global_cols, W, self.crow[:-1], mode="sum", per_sample_weights=values)

    def sample(self, A: Tensor, B: Tensor) -> Tensor:
        """(nnz,) the entries of A @ B on this pattern (A (n_rows, d), B (d, width)): an SDDMM."""
        if self.cols.numel() == 0:
            return A.new_zeros(0)
        mask = _csr(self.crow, self.global_cols, A.new_zeros(self.cols.numel()), (self.n_rows, self.width))
        return torch.sparse.sampled_addmm(mask, A, B, beta=0.0).values()

    def transpose_matmul(self, values: Tensor, A: Tensor) -> Tensor:
        """(width, d) = S^T @ A for S the sparse matrix of `values` on this pattern; A is
        (n_rows, d), or (n_rows / blocks, d) when every stacked SAE reads the same rows (x)."""
        shared = A.shape[0] != self.n_rows
        if shared not in self._transposed:
            order = torch.argsort(self.global_cols, stable=True)
            tcrow = torch.zeros(self.width + 1, dtype=torch.long, device=self.cols.device)
            tcrow[1:] = torch.cumsum(torch.bincount(self.global_cols, minlength=self.width), 0)
            rows = self.rows[order]
            self._transposed[shared] = (order, tcrow, rows % self.block_rows if shared else rows)
        order, tcrow, tcols = self._transposed[shared]
        return _csr(tcrow, tcols, values[order], (self.width, A.shape[0])) @ A


class _SparseDecode(torch.autograd.Function):
    """S @ W_dec with S the sparse matrix of `values` on `pattern` (see the module docstring)."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        return pattern.matmul(values, W_dec.reshape(-1, W_dec.shape[-1]))

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        W = W_dec.reshape(-1, W_dec.shape[-1])
        d_values = ctx.pattern.sample(grad, W.T) if ctx.needs_input_grad[0] else None
        d_W = ctx.pattern.transpose_matmul(values, grad).view(W_dec.shape) if ctx.needs_input_grad[1] else None
        return d_values, d_W, None


class _SampledPreActs(torch.autograd.Function):
    """The entries of z = (x - b_dec) @ W_enc + b_enc on `pattern` (b_dec None: not subtracted);
    `z` (detached: the dense product already computed to choose the pattern) supplies the
    forward values when given. Stacked SAEs (pattern.blocks > 1): W_enc (blocks, d_in, d_sae),
    b_enc (blocks, d_sae), b_dec (blocks, d_in), z (blocks, N, d_sae); all read the same x (N, d_in).

    Backward: dW_enc = (x - b_dec)^T @ dZ is the sparse product x^T @ dZ less the rank-1
    b_dec (x) colsum(dZ), added in place; db_enc = colsum(dZ); db_dec = -W_enc @ colsum(dZ)."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, pattern: SparsePattern,
                z: Tensor | None) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(x, W_enc, b_dec)
        if z is not None:
            return pattern.gather(z)
        if pattern.blocks > 1:
            raise NotImplementedError("stacked SAEs give z, the pre-activations they were chosen from")
        return pattern.sample(x if b_dec is None else x - b_dec, W_enc) + b_enc[pattern.cols]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, b_dec = ctx.saved_tensors
        p, need = ctx.pattern, ctx.needs_input_grad
        if need[0] and p.blocks > 1:
            raise NotImplementedError("the input gradient of stacked SAEs is not needed in training")
        d_x = p.matmul(grad, W_enc.T.contiguous()) if need[0] else None
        d_bias = grad.new_zeros(p.width).index_add_(0, p.global_cols, grad).view(p.blocks, p.n_cols, 1)
        d_W = d_b_dec = None
        W = W_enc.view(p.blocks, *W_enc.shape[-2:])  # (blocks, d_in, d_sae)
        if need[1]:
            d_Wt = p.transpose_matmul(grad, x).view(p.blocks, p.n_cols, x.shape[-1])
            if b_dec is not None:
                d_Wt.baddbmm_(d_bias, b_dec.view(p.blocks, 1, -1), alpha=-1)
            d_W = d_Wt.transpose(-1, -2).view(W_enc.shape) if W_enc.dim() == 3 else d_Wt[0].T
        if b_dec is not None and need[3]:
            d_b_dec = -torch.bmm(W, d_bias).view(b_dec.shape)
        return d_x, d_W, d_bias.view(W_enc.shape[:-2] + W_enc.shape[-1:]) if need[2] else None, d_b_dec, None, None


def sparse_decode(values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
    """(N, d_out): sum over each row's entries of value * W_dec[column]; differentiable in both."""
    with _fp32(values):
        return _SparseDecode.apply(_full(values), _full(W_dec), pattern)


def sampled_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, pattern: SparsePattern,
                     z: Tensor | None = None) -> Tensor:
    """(nnz,): ((x - b_dec) @ W_enc + b_enc) on the pattern (b_dec None: x @ W_enc + b_enc); its
    backward touches only those entries. `z`: the dense pre-activations, detached, if known."""
    with _fp32(x):
        return _SampledPreActs.apply(_full(x), _full(W_enc), _full(b_enc), _full(b_dec), pattern,
                                     None if z is None else _full(z.detach()))


def _fp32(t: Tensor):
    """Autocast off: the sparse kernels are gathers and scatters, not GEMMs, so bf16 saves them
    nothing, and embedding_bag and the sparse products want one dtype (see `_full`)."""
    return torch.autocast(t.device.type, enabled=False)


def _full(t: Tensor | None) -> Tensor | None:
    """t cast up to fp32 if it is half precision (e.g. z from an autocast GEMM), else as is."""
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t
