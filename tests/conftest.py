"""Shared fixtures: tiny real-format checkpoints written by transformers, built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# The demo checkpoint is built on first use; keep it out of the user's cache during tests.
os.environ.setdefault("ERNIE_SERVE_CACHE", tempfile.mkdtemp(prefix="ernie-serve-test-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_checkpoint(shape, dtype)` -> a checkpoint directory (cached per session)."""
    from ernie_serve.testing.checkpoints import build_tiny_checkpoint

    built: dict[tuple[str, torch.dtype], Path] = {}

    def make(shape: str = "moe_shared_tied", disk_dtype: torch.dtype = torch.bfloat16) -> Path:
        key = (shape, disk_dtype)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{shape}-{str(disk_dtype).split('.')[-1]}")
            built[key] = build_tiny_checkpoint(out, shape, disk_dtype=disk_dtype)
        return built[key]

    return make


@pytest.fixture(scope="session")
def paddle_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """`paddle_checkpoint(shape)` -> the bf16 tiny checkpoint of `shape` rewritten in the -Paddle layout (cached
    per session): the -PT original is `tiny_checkpoint(shape, torch.bfloat16)`."""
    from ernie_serve.testing.checkpoints import convert_to_paddle

    built: dict[str, Path] = {}

    def make(shape: str = "moe_shared_tied") -> Path:
        if shape not in built:
            out = tmp_path_factory.mktemp(f"{shape}-paddle")
            built[shape] = convert_to_paddle(tiny_checkpoint(shape, torch.bfloat16), out)
        return built[shape]

    return make
