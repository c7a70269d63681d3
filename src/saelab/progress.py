"""Progress of long jobs: a tqdm bar on a terminal, a plain line at intervals in a log.

tqdm hides itself when stderr is not a terminal (`disable=None`), so a 17-minute job run under
nohup, a scheduler or CI printed nothing between its first and last line. `progress_bar` keeps
tqdm's interface (iterate, `update`, `set_postfix`, `close`, `with`) and, off a terminal, prints
one line every `SAELAB_PROGRESS_SECONDS` (default 30) with the count, rate, ETA and postfix.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable

from tqdm.auto import tqdm

DEFAULT_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool | None = None):
    """A tqdm bar (`enabled=None`: on a terminal), a periodic progress line (`enabled=None`
    off a terminal), or nothing (`enabled=False`). `enabled=True` forces the tqdm bar."""
    if enabled is False or (enabled is None and sys.stderr.isatty()) or enabled is True:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=enabled is False)
    interval = float(os.environ.get("SAELAB_PROGRESS_SECONDS", DEFAULT_INTERVAL_S))
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval=interval)


class LineProgress:
    """tqdm's interface, printing `desc: n/total unit (p%), rate, ETA, postfix` to stderr at
    most once per `interval` seconds, and a last line on close if it printed any."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, interval=DEFAULT_INTERVAL_S):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        self.total = total if total is not None else _len(iterable)
        self.n, self.start_n = initial, initial
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.printed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.printed:
            self.printed = False  # once
            self._print(time.monotonic())

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self.unit}"
        parts = [f"{self.desc}: {count}", f"{rate:.3g} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _print(self, now: float) -> None:
        print(self.line(now), file=sys.stderr, flush=True)
        self.printed = True


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
