"""Building, caching and loading engines, against the stand-in `tensorrt` module (fake_tensorrt.py).

These check that the backend calls TensorRT's Python API as its reference documents it (strongly typed network,
parser errors in full, one profile per entry with every input's range, the timing cache loaded and saved, the
serialized engine cached, a bad cached engine rebuilt). They are not evidence that it runs on TensorRT: that is
`python -m ernie_serve.testing.gpu_check tensorrt` on a machine with TensorRT and a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ernie_serve.backends.tensorrt import backend as trt_backend
from ernie_serve.backends.tensorrt import build
from ernie_serve.backends.tensorrt.cache import EngineCache, Target
from ernie_serve.backends.tensorrt.runtime import tensor_specs


def _build(trt, profiles, graph: Path, timing: Path) -> bytes:
    return build.build_engine(trt, trt.Logger(), graph, profiles, timing, 1 << 30)


def _names(calls) -> list[str]:
    return [c[0] for c in calls]


def test_build_parses_profiles_times_and_serializes(trt, tiny_graph, small_profiles, tmp_path) -> None:
    config, graph = tiny_graph
    timing = tmp_path / "timing.cache"
    plan = _build(trt, small_profiles(config), graph, timing)
    assert ("Builder.create_network", 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in trt.calls
    assert ("OnnxParser.parse_from_file", str(graph)) in trt.calls
    assert ("IBuilderConfig.set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 1 << 30) in trt.calls
    # every profile sets every input's (min, opt, max), in order, before the build
    profiles = small_profiles(config)
    shapes = [c[1:] for c in trt.calls if c[0] == "IOptimizationProfile.set_shape"]
    assert shapes == [(name, *ranges) for p in profiles for name, ranges in p.items()]
    assert _names(trt.calls).count("IBuilderConfig.add_optimization_profile") == 2
    # no timing cache yet: an empty one, mismatches not ignored, saved after the build
    assert ("IBuilderConfig.create_timing_cache", b"") in trt.calls
    assert ("IBuilderConfig.set_timing_cache", False) in trt.calls
    assert timing.read_bytes() == b"timed;"
    order = _names(trt.calls)
    assert order.index("IBuilderConfig.progress_monitor") < order.index("Builder.build_serialized_network")
    assert order.index("Builder.build_serialized_network") < order.index("ITimingCache.serialize")
    # the engine has the graph's inputs and outputs and both profiles
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    specs = tensor_specs(trt, engine)
    assert specs["input_ids"].is_input and specs["input_ids"].dtype == torch.int64
    assert not specs["logits"].is_input and specs["logits"].dtype == torch.float32
    assert specs["past_key_0"].profile_shapes[1] == profiles[1]["past_key_0"]
    assert {f"new_value_{config.num_hidden_layers - 1}", "attention_bias"} <= set(specs)
    # a second build starts from the saved timing cache
    trt.calls.clear()
    _build(trt, small_profiles(config), graph, timing)
    assert ("IBuilderConfig.create_timing_cache", b"timed;") in trt.calls
    assert timing.read_bytes() == b"timed;timed;"


def test_progress_monitor_is_a_tensorrt_progress_monitor_and_sees_nested_phases(trt) -> None:
    monitor = build.progress_monitor(trt)
    assert isinstance(monitor, trt.IProgressMonitor) and ("IProgressMonitor.__init__",) in trt.calls
    monitor.phase_start("Building engine", None, 2)
    monitor.phase_start("Timing", "Building engine", 3)
    assert monitor.step_complete("Timing", 0) is True  # False would cancel the build
    monitor.phase_finish("Timing")
    monitor.phase_finish("Building engine")
    assert monitor.phases == ["Building engine", "Timing"] and not monitor._bars
    assert monitor._depth == {"Building engine": 0, "Timing": 1}


def test_parser_errors_are_reported_in_full(trt, tiny_graph, small_profiles, tmp_path) -> None:
    config, graph = tiny_graph
    trt.behaviour.parse_errors = [
        (41, "layer0.moe.nonzero", "NonZero", "NonZero is not supported with dynamic shapes"),
        (97, "layer1.scatter", "ScatterND", "reduction='add' is not supported"),
    ]
    with pytest.raises(build.GraphParseError) as failure:
        _build(trt, small_profiles(config), graph, tmp_path / "timing.cache")
    message = str(failure.value)
    assert "2 error(s)" in message
    assert "node 41 'layer0.moe.nonzero' (NonZero): NonZero is not supported with dynamic shapes" in message
    assert "node 97 'layer1.scatter' (ScatterND): reduction='add' is not supported" in message
    assert "Builder.build_serialized_network" not in _names(trt.calls)


def test_missing_external_weights_are_a_parse_error(trt, tiny_graph, small_profiles, tmp_path) -> None:
    config, graph = tiny_graph
    alone = tmp_path / "model.onnx"
    shutil.copy(graph, alone)  # without model.onnx.data beside it
    with pytest.raises(build.GraphParseError, match=r"the graph: external data model.onnx.data not found"):
        _build(trt, small_profiles(config), alone, tmp_path / "timing.cache")


def test_an_invalid_profile_or_failed_build_raises(trt, tiny_graph, small_profiles, tmp_path) -> None:
    config, graph = tiny_graph
    profiles = small_profiles(config)
    low, opt, high = profiles[1]["input_ids"]
    profiles[1]["input_ids"] = (high, opt, low)
    with pytest.raises(build.EngineBuildError, match="optimization profile 1"):
        build.build_engine(trt, trt.Logger(), graph, profiles, tmp_path / "t", 1 << 20)
    trt.behaviour.build_fails = True
    with pytest.raises(build.EngineBuildError, match="could not build"):
        _build(trt, small_profiles(config), graph, tmp_path / "t")


def test_an_input_left_out_of_a_profile_fails_the_build(trt, tiny_graph, small_profiles, tmp_path) -> None:
    config, graph = tiny_graph
    profiles = small_profiles(config)
    del profiles[0]["attention_bias"]
    with pytest.raises(build.EngineBuildError):
        build.build_engine(trt, trt.Logger(), graph, profiles, tmp_path / "t", 1 << 20)


@pytest.mark.parametrize("failure", ["none", "raise"])
def test_cache_hit_deserializes_and_a_bad_cached_engine_rebuilds(
    trt, tiny_graph, small_profiles, tmp_path, failure
) -> None:
    config, graph = tiny_graph
    cache = EngineCache.at(tmp_path, "ernie4_5_moe", "k")
    runtime = trt.Runtime(trt.Logger())
    builds: list[int] = []

    def build_now() -> bytes:
        builds.append(1)
        return _build(trt, small_profiles(config), graph, tmp_path / "timing.cache")

    first = trt_backend.cached_engine(trt, runtime, cache, build_now, {"key": "k"})
    assert (first.cached, len(builds), cache.read()[:8]) == (False, 1, b"FAKEPLAN")
    second = trt_backend.cached_engine(trt, runtime, cache, build_now, {"key": "k"})
    assert (second.cached, len(builds)) == (True, 1)  # deserialized, not built
    trt.behaviour.deserialize = failure  # e.g. an engine from another TensorRT version
    with pytest.raises(build.EngineBuildError, match="just built"):
        trt_backend.cached_engine(trt, runtime, cache, build_now, {"key": "k"})
    assert len(builds) == 2  # the miss rebuilt; the fresh engine failing too is an error, not a loop
    trt.behaviour.deserialize = "ok"
    cache.engine_path.write_bytes(b"truncated")  # TensorRT returns None for bytes it cannot read
    third = trt_backend.cached_engine(trt, runtime, cache, build_now, {"key": "k"})
    assert (third.cached, len(builds), cache.read()[:8]) == (False, 3, b"FAKEPLAN")


def test_obtain_engine_keys_the_cache_and_builds_from_the_written_graph(
    trt, tiny_graph, small_profiles, tmp_path, monkeypatch
) -> None:
    """The whole path `load` and `export tensorrt` take, with the GPU's identity and the TensorRT-flavour graph
    writer replaced (today's float graph stands in for the flavour)."""
    config, graph = tiny_graph
    written: list[str] = []

    def write_graph(model_config, weights_path, seed, dtype, out_dir: Path) -> Path:
        written.append(dtype)
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copy(graph.parent / name, out_dir / name)
        return out_dir / "model.onnx"

    monkeypatch.setattr(build, "write_graph", write_graph)
    linted: list[int] = []  # lint.py comes with the graph side of the backend; its findings are only logged
    monkeypatch.setattr(build, "lint_problems", lambda path, profiles: linted.append(len(profiles)) or ["a problem"])
    monkeypatch.setattr(trt_backend, "current_target", lambda trt, device: Target("10.13.0", "H200", (9, 0), "12.8"))
    runtime = trt.Runtime(trt.Logger())

    def obtain(precision: str):
        return trt_backend.obtain_engine(
            trt, runtime, trt.Logger(), config, None, 0, precision, small_profiles(config), tmp_path, 1 << 20, None
        )

    built = obtain("bfloat16")
    assert not built.cached and written == ["bfloat16"] and linted == [2]  # linted with both profiles
    assert built.path.parent.name.startswith(f"{config.model_type}-")
    assert (tmp_path / "timing-10.13.0-sm90.cache").is_file()
    again = obtain("bfloat16")
    assert again.cached and again.path == built.path and written == ["bfloat16"] and linted == [2]
    other = obtain("float16")  # another precision is another engine
    assert not other.cached and other.path != built.path and written == ["bfloat16", "float16"]
