"""Building a TensorRT engine from the ONNX graph, with TensorRT's Python API (TensorRT 10).

`build_engine` parses the graph with `trt.OnnxParser` into a strongly typed network (precision is the graph's
tensor dtypes: TensorRT 10+ has no FP16/BF16 builder flags for such networks), adds one optimization profile per
entry of `profiles` (index 0 prefill, 1 decode), loads and saves the timing cache, shows the build's progress
through a `trt.IProgressMonitor`, and returns `build_serialized_network`'s bytes. The `trt` module is passed in
rather than imported, so that tests run this code against a stand-in module (tests/backends/tensorrt/), which is
no evidence that it runs on TensorRT: the GPU check is (`python -m ernie_serve.testing.gpu_check tensorrt`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import structlog
from tqdm import tqdm

from ernie_serve.backends.tensorrt.cache import Profile, write_atomically
from ernie_serve.logging import show_progress

if TYPE_CHECKING:
    from ernie_serve.core.config import ModelConfig

log = structlog.get_logger("ernie_serve.tensorrt")

GRAPH_FILE = "model.onnx"


class GraphParseError(RuntimeError):
    """TensorRT's ONNX parser rejected the graph; the message lists every error it reported."""


class EngineBuildError(RuntimeError):
    """`build_serialized_network` returned nothing (TensorRT's log, at warning level and above, says why)."""


def parser_errors(parser: Any) -> list[str]:
    """One line per error the parser recorded (`num_errors`, `get_error(i)`): its code, the node (index, name,
    operator) and the description, so that a user sees every unsupported node at once, not only the first."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = error.node()
        where = "the graph" if node < 0 else f"node {node} {error.node_name()!r} ({error.node_operator()})"
        lines.append(f"{where}: {error.desc()} [{error.code()}]")
    return lines


class BuildProgress:
    """The build's progress bars, one per phase TensorRT reports (nested phases below their parent), on stderr
    when `show_progress()`; phases are also logged at debug level. TensorRT calls these from its own threads,
    hence the lock. Combined with `trt.IProgressMonitor` by `progress_monitor`; the method names and arguments
    are IProgressMonitor's."""

    def __init__(self) -> None:
        super().__init__()  # trt.IProgressMonitor's constructor, which the binding needs
        self._lock = threading.Lock()
        self._bars: dict[str, tqdm] = {}
        self._depth: dict[str, int] = {}
        self.phases: list[str] = []  # every phase started, in order (read by tests and the build log)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self.phases.append(phase_name)
            self._bars[phase_name] = tqdm(
                total=num_steps,
                desc=f"TensorRT {phase_name}",
                position=depth,
                leave=False,
                disable=not show_progress(),
                file=sys.stderr,
            )
        log.debug("tensorrt build phase", phase=phase_name, parent=parent_phase, steps=num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()


def progress_monitor(trt: ModuleType) -> BuildProgress:
    """A `BuildProgress` that TensorRT accepts as `IBuilderConfig.progress_monitor`."""
    cls = type("TensorRTBuildProgress", (BuildProgress, trt.IProgressMonitor), {})
    return cls()


def build_engine(
    trt: ModuleType,
    logger: Any,
    onnx_path: Path,
    profiles: Sequence[Profile],
    timing_cache: Path,
    workspace_bytes: int,
) -> bytes:
    """Called on an engine-cache miss: parse `onnx_path` (its external data beside it), build with the
    `profiles` (index 0 prefill, 1 decode) and return the serialized engine. The timing cache at `timing_cache`
    is read when it exists and written back after the build, so the next build skips the kernels it timed."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it resolves the external weight file relative to the model's path
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser) or ["no error recorded"]
        raise GraphParseError(
            f"TensorRT's ONNX parser rejected {onnx_path.name} with {len(errors)} error(s):\n  " + "\n  ".join(errors)
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for index, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        added = config.add_optimization_profile(profile)
        if added != index:  # -1 when TensorRT finds the profile invalid
            raise EngineBuildError(f"TensorRT refused optimization profile {index}: {dict(shapes)}")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is rejected rather than trusted
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache rejected, timing every kernel afresh", path=str(timing_cache))
        config.set_timing_cache(config.create_timing_cache(b""), False)
    monitor = progress_monitor(trt)
    config.progress_monitor = monitor  # TensorRT keeps a pointer: `monitor` must outlive the build
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT could not build the engine; the TensorRT log above says why")
    write_atomically(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    engine = bytes(memoryview(serialized))
    log.info(
        "tensorrt engine built",
        seconds=round(time.monotonic() - started, 1),
        engine_mib=round(len(engine) / 2**20, 1),
        phases=len(monitor.phases),
    )
    return engine


def deserialize(trt: ModuleType, runtime: Any, engine: bytes) -> Any | None:
    """The engine from cached bytes, or None when TensorRT cannot use them (another version wrote them, the file
    is truncated): `Runtime.deserialize_cuda_engine` returns None or raises then, and either is a cache miss."""
    try:
        return runtime.deserialize_cuda_engine(engine)
    except Exception as exc:  # the binding raises its own error types; any of them means "rebuild"
        log.warning("cached tensorrt engine does not deserialize", error=f"{type(exc).__name__}: {exc}")
        return None


def lint_problems(onnx_path: Path, profiles: Sequence[Profile]) -> list[str]:
    """What `lint.py` finds wrong with the graph for TensorRT's ONNX parser and these profiles (empty: nothing).
    Called before a build, which takes minutes on a large model, to say early what the parser may refuse."""
    import onnx

    from ernie_serve.backends.tensorrt.lint import lint_graph

    return lint_graph(onnx.load(str(onnx_path), load_external_data=False), profiles)


def write_graph(model_config: ModelConfig, weights_path: str | None, seed: int, dtype: str, out_dir: Path) -> Path:
    """Write the TensorRT flavour of the ONNX graph (`backends/onnx/graph.py`, `flavour="tensorrt"`) in `dtype`
    with its external weights into `out_dir`; returns model.onnx's path. Called on a cache miss only."""
    from ernie_serve.backends.onnx.export import ExportOptions, export_to_dir

    export_to_dir(
        model_config, weights_path, out_dir, seed, ExportOptions(dtype=dtype, graph_flavour="tensorrt"), check=False
    )
    return out_dir / GRAPH_FILE
