"""The model of `ernie_serve.testing.trained` after a few training steps, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHORT_TRAINING_STEPS = 6


@pytest.fixture(scope="session")
def briefly_trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory written by `train(..., steps=SHORT_TRAINING_STEPS)` (seconds, not minutes)."""
    from ernie_serve.testing.trained import train

    out = tmp_path_factory.mktemp("trained")
    train(out, steps=SHORT_TRAINING_STEPS)
    return out


@pytest.fixture
def trained_model_cached(briefly_trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `ERNIE_SERVE_CACHE` holding the briefly trained model where `trained_checkpoint()` looks, so
    code that asks for the trained model finds it instead of training for ten minutes."""
    from ernie_serve.testing.trained import cached_checkpoint_dir

    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path))
    cached = cached_checkpoint_dir()
    cached.symlink_to(briefly_trained_model, target_is_directory=True)
    return cached
