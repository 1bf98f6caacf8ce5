"""The CPU backend's allocator setting (`backends/torch/malloc.py`): glibc gives freed large blocks back to the
OS once the mmap threshold is pinned, and the backend pins it when it runs oneDNN kernels."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_serve import LLM
from ernie_serve.backends.torch import backend as torch_backend
from ernie_serve.backends.torch.malloc import pin_mmap_threshold
from ernie_serve.backends.torch.model import _onednn_linear_available

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# In a fresh process (the setting is process-wide and other tests load the backend): free one large mmapped
# block, which raises glibc's dynamic threshold above 1 MiB, then allocate 64 blocks of 1 MiB, write them, and
# free all but the last. Prints the RSS growth in MiB that stays after the frees.
_PATTERN = """
import ctypes, json, sys
from ernie_serve.backends.torch.malloc import pin_mmap_threshold
from ernie_serve.backends.torch.model import _onednn_linear_available
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
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
print(json.dumps({"pinned": pinned, "kept_mib": rss_mib() - before}))
"""


def _kept_after_free(mode: str) -> dict:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings from the developer's environment
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_pinned_threshold_returns_freed_blocks() -> None:
    unpinned, pinned = _kept_after_free("default"), _kept_after_free("pin")
    assert pinned["pinned"] is True
    # without the pin the 63 freed MiB stay resident (the heap cannot shrink past the live last block)
    assert unpinned["kept_mib"] > 48
    assert pinned["kept_mib"] < 8


@glibc_only
def test_user_allocator_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert pin_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert pin_mmap_threshold() is False


@pytest.mark.parametrize(("prepack", "fixed"), [(True, True), (False, True), (True, False)])
def test_backend_pins_with_onednn_kernels_only(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, prepack: bool, fixed: bool
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(torch_backend, "pin_mmap_threshold", lambda: calls.append(None) or True)
    path: Path = tiny_checkpoint("moe_shared_tied")
    options = dict(cpu_weight_prepack=prepack, cpu_fixed_mmap_threshold=fixed)
    with LLM(model=str(path), device="cpu", num_gpu_blocks_override=8, **options):
        pass
    assert len(calls) == (1 if prepack and fixed and _onednn_linear_available() else 0)
