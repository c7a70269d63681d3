"""saelab's benchmark: `python -m bench` (or `make bench`) prints one table, measured in one run
on the machine at hand, each row beside its reference (the matrix-product roofline of the same
shapes, SAELens's own step where `sae-lens` is importable, the disk's sequential read rate, ...),
and writes it as JSON. See bench/README.md.

A bench module (listed in `bench.__main__.MODULES`) exposes `rows(quick: bool) -> list[dict]`,
each dict made by `row(...)`: the keys below, exactly. `ratio` is value / reference taken in the
direction where more is better (the unit text says which), None without a reference. A row that
cannot be measured on this machine is `skipped(...)`: its value is None.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

ROW_KEYS = ("row", "value", "unit", "reference", "reference_value", "ratio", "peak_mib", "note")


def row(row: str, value: float, unit: str, reference: str, reference_value: float | None = None,
        ratio: float | None = None, peak_mib: float | None = None, note: str = "") -> dict:
    """One line of the table. With a reference value and no ratio given, the ratio is
    value / reference_value (right for rates, where more is better)."""
    if ratio is None and reference_value:
        ratio = value / reference_value
    return {"row": row, "value": float(value), "unit": unit, "reference": reference,
            "reference_value": None if reference_value is None else float(reference_value),
            "ratio": None if ratio is None else float(ratio),
            "peak_mib": None if peak_mib is None else float(peak_mib), "note": note}


def skipped(row: str, why: str) -> dict:
    """The line of a row that could not be measured here (e.g. a model not installed): no value,
    the reason in its note."""
    return {"row": row, "value": None, "unit": "", "reference": "", "reference_value": None, "ratio": None,
            "peak_mib": None, "note": f"skipped: {why}"}


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc keeps some), so the resident
    size a measurement starts from is what the process still holds."""
    import gc

    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a piece of work, in MiB above what the process held when it began: CPU
    resident memory (Linux: the high-water mark is reset through /proc/self/clear_refs), or the
    CUDA allocator's peak on a GPU. `mib` is None where neither can be read."""

    def __init__(self, device: str = "cpu"):
        self.device, self.mib = device, None

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self._base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        peak = _status_kib("VmHWM")
        if peak is not None and self._base is not None:
            self.mib = max(0, peak - self._base) / 1024


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, float | None, object]:
    """(wall seconds, peak MiB (PeakMemory), fn's result) of one call of fn, synchronised on a GPU."""
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, mem.mib, out


def best_times(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """The best wall time of each function over `repeats` rounds, after one warm-up call each.
    Rounds interleave the functions, so load from other processes hits all of them alike and
    their ratios stay meaningful on a shared machine."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best
