"""Keep freed large blocks in the process heap while training on a CPU.

glibc hands every block above 32 MiB back to the kernel when it is freed (munmap) and maps it
again on the next allocation. A dense SAE step allocates several (batch, d_sae) tensors of
hundreds of MiB, so each step pays for hundreds of thousands of fresh page faults. That is about
12% of a relu step at d_sae 16384 on 2 cores (bench/README.md). Raising glibc's mmap threshold
to its maximum (blocks up to 2 GiB come from the heap) and turning its heap trimming off (mallopt)
keeps those blocks in the heap for reuse, as a GPU caching allocator does. Trimming must be off,
not just raised: a stacked sweep (saelab.train.batched) frees several (n, batch, d_sae) blocks of
hundreds of MiB at once, and with 1 GiB kept it faulted ~400k pages a step (8 relu SAEs, d_in 576,
d_sae 4608: the stack then ran 10-20% slower than looping the same SAEs).
The cost: the process keeps its peak memory until it exits. Only glibc (Linux) has these
settings; elsewhere this does nothing. SAELAB_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_MAX = 2**31 - 1  # mallopt takes a C int: blocks up to 2 GiB come from the heap
_NEVER = -1  # M_TRIM_THRESHOLD -1: free heap is never handed back (glibc's mallopt(3))


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process: set glibc's thresholds as above. True if they are set (now or before)."""
    if os.environ.get("SAELAB_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))
    except (OSError, AttributeError):  # not glibc
        return False
