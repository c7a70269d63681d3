"""keep_freed_memory: a freed large tensor stays in the heap (resident) instead of going back to
the kernel, so the next step's allocation of it costs no page faults; the opt-out restores
glibc's default. Each case runs in a child process, since the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import torch
from saelab.train.host_memory import keep_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

print(keep_freed_memory())
blocks = [torch.ones(N_MIB * 2**18) for _ in range(N_BLOCKS)]  # touched
del blocks
print(rss_mib())
"""


def _run(n_blocks: int = 1, mib: int = 256, **env) -> tuple[bool, float]:
    code = f"N_BLOCKS, N_MIB = {n_blocks}, {mib}\n" + CHILD
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_resident_unless_turned_off():
    kept, rss_kept = _run()
    off, rss_off = _run(SAELAB_KEEP_FREED_MEMORY="0")
    assert kept and not off
    assert rss_kept - rss_off > 200  # the 256 MiB block is still held, ready for reuse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_many_freed_blocks_stay_resident():
    """A stacked sweep frees several blocks of hundreds of MiB at once (1.5 GiB here): all of it
    stays in the heap. With glibc trimming free heap above a threshold (1 GiB before), part went
    back to the kernel and was faulted in again on every step."""
    kept, rss_kept = _run(n_blocks=3, mib=512)
    off, rss_off = _run(n_blocks=3, mib=512, SAELAB_KEEP_FREED_MEMORY="0")
    assert kept and not off
    assert rss_kept - rss_off > 1400
