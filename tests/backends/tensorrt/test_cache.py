"""The engine cache key and its files: pure functions, no TensorRT."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ernie_serve.backends.tensorrt.cache import EngineCache, Target, engine_key, timing_cache_path

TARGET = Target("10.13.0", "NVIDIA H200", (9, 0), "12.8")
PROFILES = [
    {"input_ids": ((1, 2), (4, 16), (4, 16)), "past_key_0": ((1, 1, 1, 8), (4, 1, 16, 8), (4, 1, 32, 8))},
    {"input_ids": ((1, 1), (8, 1), (8, 1)), "past_key_0": ((1, 1, 1, 8), (8, 1, 32, 8), (8, 1, 64, 8))},
]


def _key(**changes) -> str:
    target = dataclasses.replace(TARGET, **{k: v for k, v in changes.items() if k in TARGET.__dataclass_fields__})
    return engine_key(
        changes.get("graph", "g1"), target, changes.get("profiles", PROFILES), changes.get("precision", "bfloat16")
    )[0]


def test_key_is_stable_and_its_material_reads_back_equal() -> None:
    key, material = engine_key("g1", TARGET, PROFILES, "bfloat16")
    assert key == _key() and len(key) == 24
    assert json.loads(json.dumps(material)) == material  # what engine.json stores is what was hashed
    # profile order inside a dict does not matter, profile order in the list does
    reordered = [dict(reversed(list(p.items()))) for p in PROFILES]
    assert _key(profiles=reordered) == key


@pytest.mark.parametrize(
    "change",
    [
        {"graph": "g2"},
        {"tensorrt_version": "10.14.0"},
        {"gpu_name": "NVIDIA H100 80GB HBM3"},
        {"compute_capability": (8, 9)},
        {"cuda_version": "12.9"},
        {"precision": "float16"},
        {"profiles": [PROFILES[0], {**PROFILES[1], "input_ids": ((1, 1), (8, 1), (16, 1))}]},
        {"profiles": list(reversed(PROFILES))},
    ],
)
def test_every_input_of_the_key_changes_it(change) -> None:
    assert _key(**change) != _key()


def test_timing_cache_is_per_tensorrt_version_and_gpu_generation(tmp_path) -> None:
    assert timing_cache_path(tmp_path, TARGET) == tmp_path / "timing-10.13.0-sm90.cache"
    assert timing_cache_path(tmp_path, dataclasses.replace(TARGET, compute_capability=(10, 0))).name.endswith(
        "sm100.cache"
    )


def test_engine_cache_reads_what_it_wrote_and_leaves_no_staging_files(tmp_path) -> None:
    cache = EngineCache.at(tmp_path, "ernie4_5_moe", "abc")
    assert cache.read() is None
    cache.write(b"plan-1", {"key": "abc"})
    cache.write(b"plan-2", {"key": "abc"})  # a rebuild replaces it
    assert cache.read() == b"plan-2"
    assert sorted(p.name for p in cache.directory.iterdir()) == ["engine.json", "engine.plan"]
    assert json.loads((cache.directory / "engine.json").read_text()) == {"key": "abc"}
