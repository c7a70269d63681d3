"""Order-independent building blocks for the one-pass feature scan (interpret/scan.py).

Two ideas keep the scan exact in ONE pass, in memory that does not grow with the tokens seen:

* Bottom-n by hash key. Each candidate (context row, position, feature) gets a pseudo-random
  key that is a hash of those integers and a seed. The n smallest keys of a set are a uniform
  sample without replacement of that set, and the n smallest of a union are the n smallest of
  the parts' n smallest, so samples merge exactly. The sample depends only on the data: not on
  the batch size, the device, or the order batches arrive in.
* Power-of-two ranges. A feature's activation range is [0, R] with R = 2^ceil(log2(max so far)),
  cut into `n_fine` bins (lo, hi]. When the max grows past R, R doubles d times and fine bin b
  becomes bin b >> d, exactly (no value is ever re-read), so histograms and per-bin samples
  re-bin without a second pass. At the end R = 2^ceil(log2(max)) lies in [max, 2 max): more
  than half of the fine bins are in use.
"""

from __future__ import annotations

import torch
from torch import Tensor

KEY_MAX = (1 << 63) - 1  # "no item": larger than every hash key
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser (int64 arithmetic wraps modulo 2^64)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def hash_keys(*ints: Tensor, seed: int = 0) -> Tensor:
    """Pseudo-random int64 keys in [0, 2^63 - 1) from integer tensors of one shape."""
    x = _mix(torch.tensor(seed, dtype=torch.int64, device=ints[0].device))
    for v in ints:
        x = _mix(x + v.to(torch.int64) * _GOLDEN)
    return torch.clamp(x & KEY_MAX, max=KEY_MAX - 1)


def first_per_group(group: Tensor, order: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices of the `n` items of smallest `order` in each group, and each one's rank 0..n-1.

    group, order: (N,). Ties in `order` keep the input order (stable sorts)."""
    idx = torch.argsort(order, stable=True)
    idx = idx[torch.argsort(group[idx], stable=True)]
    _, counts = torch.unique_consecutive(group[idx], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(idx.numel(), device=idx.device) - starts
    keep = rank < n
    return idx[keep], rank[keep]


def pow2_exponent(x: Tensor) -> Tensor:
    """ceil(log2(x)) for x > 0, exactly (frexp, not a float log): R = 2**e >= x > R / 2."""
    mantissa, exp = torch.frexp(x)
    return exp.to(torch.int64) - (mantissa == 0.5).to(torch.int64)


def fine_bin(values: Tensor, exponent: Tensor, n_fine: int) -> Tensor:
    """Bin of each value in (0, R], R = 2**exponent, split into n_fine bins (lo, hi]: 0..n_fine-1."""
    scaled = torch.ldexp(values.to(torch.float64), -exponent) * n_fine
    return (torch.ceil(scaled) - 1).clamp(0, n_fine - 1).to(torch.int64)


class BinSamples:
    """Per (feature, fine bin): the `per_bin` candidates of smallest hash key, plus a count.

    State: `exp` (d_sae,) range exponents (-1 << 30 where nothing was seen), `counts`
    (d_sae, n_fine) int64 = the exact activation histogram, and slots (d_sae * n_fine, per_bin)
    of key / value / row / pos. Memory: d_sae * n_fine * per_bin * 28 bytes."""

    UNSET = -(1 << 30)

    def __init__(self, d_sae: int, n_fine: int, per_bin: int, device=None):
        self.d_sae, self.n_fine, self.per_bin = d_sae, n_fine, per_bin
        slots = (d_sae * n_fine, per_bin)
        self.exp = torch.full((d_sae,), self.UNSET, dtype=torch.int64, device=device)
        self.counts = torch.zeros(d_sae, n_fine, dtype=torch.int64, device=device)
        self.key = torch.full(slots, KEY_MAX, dtype=torch.int64, device=device)
        self.value = torch.zeros(slots, dtype=torch.float32, device=device)
        self.row = torch.zeros(slots, dtype=torch.int64, device=device)
        self.pos = torch.zeros(slots, dtype=torch.int64, device=device)
        self.threshold = torch.full((d_sae * n_fine,), KEY_MAX, dtype=torch.int64, device=device)

    def grow(self, batch_max: Tensor) -> None:
        """Widen the ranges of features whose batch max (d_sae,) exceeds R; re-bin exactly."""
        active = batch_max > 0
        new = torch.where(active, pow2_exponent(batch_max.clamp_min(1e-38)), self.UNSET)
        new = torch.maximum(new, self.exp)
        moved = torch.nonzero((new > self.exp) & (self.exp != self.UNSET)).flatten()
        if moved.numel():
            shift = (new[moved] - self.exp[moved]).clamp(max=62)
            target = torch.arange(self.n_fine, device=moved.device)[None] >> shift[:, None]
            old = self.counts[moved]
            self.counts[moved] = torch.zeros_like(old).scatter_add_(1, target, old)
            self._rebin_slots(moved, target)
        self.exp = new

    def _rebin_slots(self, feats: Tensor, target: Tensor) -> None:
        """Pool the slots of `feats` (A,) into their merged fine bins `target` (A, n_fine)."""
        groups = (feats[:, None] * self.n_fine + torch.arange(self.n_fine, device=feats.device)).flatten()
        new_group = (feats[:, None] * self.n_fine + target).flatten()
        items = (self.key[groups], self.value[groups], self.row[groups], self.pos[groups])
        self.key[groups] = KEY_MAX
        self.threshold[groups] = KEY_MAX
        self._merge(new_group[:, None].expand_as(items[0]).flatten(), *(t.flatten() for t in items))

    def add(self, feat: Tensor, value: Tensor, row: Tensor, pos: Tensor, seed: int) -> None:
        """Count and sample active entries (nnz,) (call `grow` with the batch max first)."""
        group = feat * self.n_fine + fine_bin(value, self.exp[feat], self.n_fine)
        self.counts.view(-1).index_add_(0, group, torch.ones_like(group))
        key = hash_keys(row, pos, feat, seed=seed)
        keep = key < self.threshold[group]
        if bool(keep.any()):
            self._merge(group[keep], key[keep], value[keep], row[keep], pos[keep])

    def _merge(self, group, key, value, row, pos) -> None:
        """Merge candidates into the slots of their groups, keeping the smallest keys."""
        mark = torch.zeros(self.key.shape[0], dtype=torch.bool, device=group.device)
        mark[group] = True
        touched = torch.nonzero(mark).flatten()  # unique groups, without a sort
        old = [t[touched].flatten() for t in (self.key, self.value, self.row, self.pos)]
        g_all = torch.cat([touched.repeat_interleave(self.per_bin), group])
        k_all, v_all, r_all, p_all = (torch.cat([o, n]) for o, n in
                                      zip(old, (key, value, row, pos)))
        idx, rank = first_per_group(g_all, k_all, self.per_bin)
        g = g_all[idx]
        self.key[g, rank], self.value[g, rank] = k_all[idx], v_all[idx].to(self.value.dtype)
        self.row[g, rank], self.pos[g, rank] = r_all[idx], p_all[idx]
        self.threshold[touched] = self.key[touched].max(1).values

    def quantiles(self, max_act: Tensor, n_bins: int, per_bin: int) -> dict[str, Tensor]:
        """Final bins: the fine bins in use, m = ceil(max / w), grouped into `n_bins` runs of
        near-equal width (fine bin b -> b * n_bins // m), each sampled by smallest key.

        Returns edges (d_sae, n_bins + 1) (last = max), count (d_sae, n_bins): the active values
        in each final bin, exactly, and key / value / row / pos (d_sae, n_bins, per_bin); empty
        entries have key KEY_MAX."""
        d, nf, device = self.d_sae, self.n_fine, self.exp.device
        seen = self.exp != self.UNSET
        width = torch.where(seen, torch.ldexp(torch.ones(d, dtype=torch.float64, device=device),
                                              self.exp.clamp(min=-1000)) / nf, 0.0)
        m = fine_bin(max_act.clamp_min(1e-38), self.exp, nf).add(1).clamp_min(n_bins)
        i = torch.arange(n_bins + 1, device=device)
        starts = (i[None] * m[:, None] + n_bins - 1) // n_bins
        edges = (starts * width[:, None]).to(torch.float32)
        edges[:, -1] = max_act
        fine = torch.arange(nf, device=device)
        final = (fine[None] * n_bins // m[:, None]).clamp(max=n_bins - 1)  # (d_sae, n_fine)
        group = (torch.arange(d, device=device)[:, None] * n_bins + final).flatten()
        group = group[:, None].expand(-1, self.per_bin).flatten()
        idx, rank = first_per_group(group, self.key.flatten(), per_bin)
        out = {"key": torch.full((d * n_bins, per_bin), KEY_MAX, dtype=torch.int64, device=device)}
        for name in ("value", "row", "pos"):
            out[name] = torch.zeros((d * n_bins, per_bin), dtype=getattr(self, name).dtype,
                                    device=device)
        for name in out:
            out[name][group[idx], rank] = getattr(self, name).flatten()[idx]
        out = {k: v.view(d, n_bins, per_bin) for k, v in out.items()}
        count = torch.zeros(d, n_bins, dtype=self.counts.dtype, device=device).scatter_add_(1, final, self.counts)
        return {"edges": edges, "count": count, **out}
