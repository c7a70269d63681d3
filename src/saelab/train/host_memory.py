"""Keep freed large blocks in the process heap while training on a CPU.

glibc hands every block above 32 MiB back to the kernel when it is freed (munmap) and maps it
again on the next allocation. A dense SAE step allocates several (batch, d_sae) tensors of
hundreds of MiB, so each step pays for hundreds of thousands of fresh page faults. That is about
12% of a relu step at d_sae 16384 on 2 cores (bench/README.md). Raising glibc's mmap and trim
thresholds (mallopt) keeps those blocks in the heap for reuse, as a GPU caching allocator does.
The cost: the process keeps its peak memory until it exits. Only glibc (Linux) has these
settings; elsewhere this does nothing. SAELAB_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_THRESHOLD = 2**30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap is kept


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process: set glibc's thresholds as above. True if they are set (now or before)."""
    if os.environ.get("SAELAB_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False
