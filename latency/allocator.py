"""A steady memory allocator for timing: activations are not handed back to the system between runs.

glibc's malloc serves large blocks (a convolution's activations) with mmap and gives freed
memory at the top of its heap back to the system. In a process with little else on its heap,
such as a fresh agent, every forward pass then maps its activations afresh and pays a page
fault per 4 KiB touched: the unpruned ResNet of the benchmark took 544 faults and 12 ms a run
at batch 8 instead of 1 fault and 8 ms. The cost grows with the activation memory, so it makes
wide models look slower than narrow ones by an amount that depends on the process's history,
not on the model. Pinning the thresholds keeps freed blocks for reuse, as a long-running
inference server's allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems: blocks above it are always mapped.
MMAP_THRESHOLD_BYTES = 32 << 20
# Freed memory at the top of the heap is kept up to this much.
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def steady_allocator() -> str:
    """Pin glibc malloc's mmap and trim thresholds for this process, once.

    Returns what the fingerprint records: "glibc-steady" where the thresholds were pinned,
    "system" where the C library is not glibc (or refused), whose allocator is left as it is.
    """
    if not sys.platform.startswith("linux"):
        return "system"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    pinned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    pinned = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and pinned
    return "glibc-steady" if pinned else "system"
