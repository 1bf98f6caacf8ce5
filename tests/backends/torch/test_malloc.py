"""The CPU backend's heap trimming (`backends/torch/malloc.py`): `malloc_trim` gives the freed heap blocks that
glibc keeps back to the OS, the trimmer calls it once per interval, and the backend trims after its steps when it
runs oneDNN kernels."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch import backend as torch_backend
from ernie_serve.backends.torch.malloc import HeapTrimmer
from ernie_serve.backends.torch.model import _onednn_linear_available

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")

# In a fresh process (RSS is process-wide): free one large mmapped block, which raises glibc's dynamic mmap
# threshold above 1 MiB, then allocate 64 blocks of 1 MiB (now from the heap), write them, free all but the
# last, and let the trimmer run once. Prints the RSS growth in MiB that stays after the frees.
_PATTERN = """
import ctypes, json, sys
from ernie_serve.backends.torch.malloc import HeapTrimmer
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
ticks = iter([0.0, 10.0, 10.0])
trimmer = HeapTrimmer(interval_s=1.0, clock=lambda: next(ticks))
trimmer.maybe_trim()  # starts the clock
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.free(libc.malloc(8 << 20))
before = rss_mib()
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
for block in blocks[:-1]:
    libc.free(block)
kept = rss_mib() - before
trimmed = trimmer.maybe_trim() if sys.argv[1] == "trim" else False
print(json.dumps({"trimmed": trimmed, "kept_mib": kept, "after_mib": rss_mib() - before}))
"""


def _kept_after_free(mode: str) -> dict:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings from the developer's environment
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_trim_returns_the_freed_heap_blocks() -> None:
    kept, trimmed = _kept_after_free("keep"), _kept_after_free("trim")
    # without a trim the 63 freed MiB stay resident (the heap cannot shrink past the live last block)
    assert kept["kept_mib"] > 48 and kept["after_mib"] > 48
    assert trimmed["trimmed"] is True
    assert trimmed["kept_mib"] > 48 and trimmed["after_mib"] < 8


def test_trims_once_per_interval() -> None:
    now = [100.0]
    calls: list[int] = []
    trimmer = HeapTrimmer(2.0, trim=lambda pad: calls.append(pad) or 1, clock=lambda: now[0])
    assert trimmer.maybe_trim() is False  # the first step starts the clock
    now[0] = 101.9
    assert trimmer.maybe_trim() is False
    now[0] = 102.0
    assert trimmer.maybe_trim() is True
    assert trimmer.maybe_trim() is False  # the interval counts again from the trim
    now[0] = 104.5
    assert trimmer.maybe_trim() is True
    assert calls == [0, 0] and trimmer.num_trims == 2


def test_without_malloc_trim_nothing_happens() -> None:
    trimmer = HeapTrimmer(0.5, clock=iter([0.0, 5.0, 10.0]).__next__)
    trimmer._trim = None  # as under a C library without malloc_trim
    assert not trimmer.available
    assert [trimmer.maybe_trim(), trimmer.maybe_trim()] == [False, False]


@pytest.mark.parametrize(("prepack", "interval"), [(True, 1e-9), (False, 1e-9), (True, 0.0)])
def test_backend_trims_after_steps_with_onednn_kernels_only(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, prepack: bool, interval: float
) -> None:
    trims: list[int] = []

    class CountingTrimmer(HeapTrimmer):
        def __init__(self, interval_s: float) -> None:
            super().__init__(interval_s, trim=lambda pad: trims.append(pad) or 1)

    monkeypatch.setattr(torch_backend, "HeapTrimmer", CountingTrimmer)
    path: Path = tiny_checkpoint("moe_shared_tied")
    options = dict(cpu_weight_prepack=prepack, cpu_malloc_trim_interval=interval)
    with LLM(model=str(path), device="cpu", num_gpu_blocks_override=8, **options) as llm:
        outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0))
    assert len(outputs[0].outputs[0].token_ids) == 4
    if prepack and interval > 0 and _onednn_linear_available():
        assert len(trims) >= 3  # the interval (1 ns) has passed at every step after the first
    else:
        assert trims == []
