"""The C allocator setting the CPU backend needs so that a long-running server's memory stays flat.

oneDNN, which runs the prepacked CPU weights, builds one primitive per input shape (each step's token count,
each expert's share of it), keeps up to 1,024 of them in its cache, and drops the oldest for each new shape;
building one allocates and frees blocks of a few hundred KiB to MiBs. glibc's malloc raises its mmap threshold
to the size of every mmapped block freed (up to 32 MiB), after which blocks of those sizes come from the heap
and, freed, mostly stay in the process: under a soak RSS grew by hundreds of MiB, gigabytes in a
microbenchmark, that `malloc_trim` gave back at once. A fixed threshold (glibc's own default, 128 KiB; setting
it turns the raising off) keeps those blocks mmapped, so freeing one returns it to the OS. docs/reliability.md
("Soak") has the measurements.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024
# a user who tunes the allocator through the environment keeps their setting
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def pin_mmap_threshold() -> bool:
    """Called once the CPU backend knows it runs oneDNN kernels: fix glibc's mmap threshold for the whole
    process (from then on). True when it took effect; False on another C library or when the user's
    environment already sets the allocator (`MALLOC_*_`, `GLIBC_TUNABLES` with malloc)."""
    if any(name in os.environ for name in _USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc-like
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
