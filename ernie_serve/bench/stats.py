"""Latency statistics as vLLM's benchmarks report them: mean, median and p99 in milliseconds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile by linear interpolation between closest ranks (numpy's default, which vLLM's
    reports use, so figures compare); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """`{"mean", "median", "p99"}` of durations given in seconds, in milliseconds (all 0.0 for none)."""
    ms = [s * 1000 for s in seconds]
    return {
        "mean": statistics.fmean(ms) if ms else 0.0,
        "median": statistics.median(ms) if ms else 0.0,
        "p99": percentile(ms, 99),
    }
