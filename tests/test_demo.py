"""The demo model: built once into the cache, atomically, with a progress bar, and served with its own
2,048-token tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

import ernie_serve.demo as demo
from ernie_serve.core.config import EngineSettings
from ernie_serve.demo_tokenizer import DEMO_VOCAB_SIZE
from ernie_serve.models import resolve_model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The demo checkpoint built from scratch in an empty cache, and the progress bars shown meanwhile."""
    root = tmp_path_factory.mktemp("demo-cache")
    bars: list[dict[str, Any]] = []

    def recording_progress(
        items: Iterable[Any], description: str, total: int | None = None, unit: str = "it"
    ) -> Iterator[Any]:
        bar = {"description": description, "total": total, "unit": unit, "steps": 0}
        bars.append(bar)
        for item in items:
            bar["steps"] += 1
            yield item

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ERNIE_SERVE_CACHE", str(root))
        mp.setattr(demo, "progress", recording_progress)
        path = demo.demo_checkpoint_dir()
    return path, bars


def test_built_into_the_cache(built: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = built
    assert path.name == f"demo-v{demo.DEMO_VERSION}"
    # Only the finished directory: the staging directory was renamed into place.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    expected = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in path.iterdir()) == expected


def test_progress_bar_while_building(built: tuple[Path, list[dict[str, Any]]]) -> None:
    path, bars = built
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        num_tensors = len(list(f.keys()))
    assert bars == [
        {"description": "building the demo model", "total": num_tensors, "unit": "tensor", "steps": num_tensors}
    ]


def test_second_call_reuses_the_checkpoint(
    built: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = built
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(path.parent))

    def no_rebuild(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the demo model was built again")

    monkeypatch.setattr(demo, "write_random_checkpoint", no_rebuild)
    assert demo.demo_checkpoint_dir() == path


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(demo, "write_random_checkpoint", fail)
    with pytest.raises(OSError, match="disk full"):
        demo.demo_checkpoint_dir()
    assert list(tmp_path.iterdir()) == []  # no staging directory, no half-built demo-v1


def test_demo_model_resolves_to_its_checkpoint_and_tokenizer(
    built: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = built
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(path.parent))
    resolved = resolve_model(EngineSettings(model="demo"))
    assert (resolved.weights_path, resolved.tokenizer_path) == (str(path), str(path))
    assert resolved.config == demo.DEMO_CONFIG
    assert resolved.generation_defaults == {"temperature": 0.8, "top_p": 0.8}
    tokenizer = resolved.load_tokenizer()
    # The embedding is padded past the tokenizer, as in real checkpoints; the tokenizer is not padded.
    assert tokenizer.vocab_size == DEMO_VOCAB_SIZE < resolved.config.vocab_size
    assert tokenizer.stop_token_ids == frozenset({2, 4})
    assert tokenizer.decode(tokenizer.encode("Hello 你好 😀")) == "Hello 你好 😀"
