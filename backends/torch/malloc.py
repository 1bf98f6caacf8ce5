"""Giving the C allocator's free memory back to the OS now and then, so that a long-running CPU server stays flat.

oneDNN, which runs the prepacked CPU weights, builds one primitive per input shape (each step's token count,
each expert's share of it), keeps up to 1,024 of them in its cache, and drops the oldest for each new shape;
building one allocates and frees blocks of a few hundred KiB to MiBs. glibc's malloc raises its mmap threshold
to the size of every mmapped block freed (up to 32 MiB), after which blocks of those sizes come from the heap
and, freed, mostly stay in the process: under a soak RSS grew by hundreds of MiB, gigabytes in a
microbenchmark, all of which `malloc_trim(0)` gives back at once. So the backend calls it at most once per
interval, after a step. Fixing the threshold instead (the first fix) kept memory as flat but made every
multi-row activation a fresh mmap, which cost ~40% of CPU throughput; docs/reliability.md ("Soak") has both.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable


@functools.cache  # looked up once: `trim_heap` runs after every weight's repacking
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None under a C library without it (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim


def trim_heap() -> bool:
    """`malloc_trim(0)` now; False where the C library has none. For one-off work that frees many large
    temporaries of many sizes: repacking a quantized model's weights at load left 2.4x the weights' memory in
    the heap without it (3 layers of the 21B-A3B: 2.25 GiB before, 5.42 after, 2.27 trimmed)."""
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimmer:
    """Calls `malloc_trim(0)` when `interval_s` has passed since the last call. `maybe_trim` is called by the
    torch backend on the engine thread after each step it runs on CPU with oneDNN kernels; the first call only
    starts the clock. A trim walks the heap's free chunks (~10 ms for a 1.7 GiB process here) and the pages it
    returns fault in again when reused, so once a second costs about 1% of a busy server's time."""

    def __init__(
        self,
        interval_s: float,
        trim: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._clock = clock
        self._last: float | None = None
        self.num_trims = 0

    @property
    def available(self) -> bool:
        """False where the C library has no `malloc_trim`: `maybe_trim` then does nothing."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim (or the first call); True when it trimmed."""
        now = self._clock()
        if self._trim is None or self._last is None:
            self._last = now
            return False
        if now - self._last < self.interval_s:
            return False
        self._trim(0)
        self.num_trims += 1
        self._last = self._clock()  # after the trim: its own time does not count toward the next interval
        return True
