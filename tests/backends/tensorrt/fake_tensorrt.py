"""A stand-in for the `tensorrt` module: the part of TensorRT 10's Python API the backend calls, with the names,
arguments and return conventions of its Python API reference (trt.Builder, INetworkDefinition, OnnxParser and
IParserError, IBuilderConfig, IOptimizationProfile, ITimingCache, IHostMemory, IProgressMonitor, Runtime,
ICudaEngine, IExecutionContext), recording every call in `calls`.

It computes nothing: the parser reads the ONNX graph's inputs and outputs (not its nodes), the "engine" is a JSON
description of those tensors and the profiles, and `execute_async_v3` only checks that every shape and address
was set. Tests that use it show that the backend calls TensorRT as documented; they are not evidence that it runs
on TensorRT (the GPU check is). Install it with `install(monkeypatch)`, which puts it in `sys.modules`.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__version__ = "10.13.0"


@dataclass
class Behaviour:
    """What the stand-in does where TensorRT could fail; tests set these."""

    parse_errors: list[tuple[int, str, str, str]] = field(default_factory=list)  # (node, name, op, description)
    deserialize: str = "ok"  # "ok", "none" (returns None, as TensorRT does for a bad plan) or "raise"
    build_fails: bool = False  # build_serialized_network returns None
    # execute_async_v3 fills every output with this byte through its bound address (ctypes.memset): for tests
    # binding CPU tensors only, to show which memory the engine would write
    fill_outputs: int | None = None
    # execute_async_v3 reads every input through its bound address, calls this with {name: array} and writes
    # the {name: array} it returns through the outputs' addresses: a test can let onnxruntime compute the
    # graph in place of the engine (CPU tensors only)
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None


calls: list[tuple[Any, ...]] = []
behaviour = Behaviour()


def reset() -> None:
    calls.clear()
    global behaviour
    behaviour = Behaviour()


def install(monkeypatch: Any) -> Any:
    """Put this module in `sys.modules["tensorrt"]` for one test, freshly reset; returns the module."""
    module = sys.modules[__name__]
    reset()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


class Logger:
    # trt.Logger.Severity's members are also reachable as trt.Logger.WARNING etc.
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = WARNING) -> None:
        self.min_severity = min_severity


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ErrorCode(enum.Enum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    INVALID_NODE = 6
    UNSUPPORTED_NODE = 8


_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT64": 8, "INT32": 4, "BOOL": 1}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 7: DataType.INT64, 6: DataType.INT32}


class IHostMemory(bytearray):
    """Host memory TensorRT returns (a serialized engine or timing cache); supports the buffer protocol."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> IHostMemory:
        calls.append(("ITimingCache.serialize",))
        return IHostMemory(self.data)


class IParserError:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._node, self._name, self._op, self._desc = node, name, op, desc

    def code(self) -> ErrorCode:
        return ErrorCode.UNSUPPORTED_NODE

    def desc(self) -> str:
        return self._desc

    def file(self) -> str:
        return "ModelImporter.cpp"

    def func(self) -> str:
        return "parseNode"

    def line(self) -> int:
        return 1

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


@dataclass
class ITensor:
    name: str
    dtype: DataType
    shape: tuple[int | str, ...]  # -1 in TensorRT for a dynamic dimension; the ONNX dim name kept for the fake


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[IParserError] = []
        calls.append(("OnnxParser",))

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> IParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse_from_file(self, model: str) -> bool:
        import onnx

        calls.append(("OnnxParser.parse_from_file", model))
        proto = onnx.load(model, load_external_data=False)
        for init in proto.graph.initializer:  # TensorRT reads external weights relative to the model's path
            for entry in init.external_data:
                if entry.key == "location" and not (Path(model).parent / entry.value).is_file():
                    self._errors.append(IParserError(-1, "", "", f"external data {entry.value} not found"))
        for info, into in ((proto.graph.input, self.network.inputs), (proto.graph.output, self.network.outputs)):
            for value in info:
                dims = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
                into.append(ITensor(value.name, _ONNX_TYPES[value.type.tensor_type.elem_type], dims))
        self._errors += [IParserError(*error) for error in behaviour.parse_errors]
        return not self._errors


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        calls.append(("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max)))
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class IProgressMonitor:
    """The base class the application subclasses; TensorRT calls phase_start/step_complete/phase_finish."""

    def __init__(self) -> None:
        calls.append(("IProgressMonitor.__init__",))


class IBuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self._monitor: IProgressMonitor | None = None

    @property
    def progress_monitor(self) -> IProgressMonitor | None:
        return self._monitor

    @progress_monitor.setter
    def progress_monitor(self, monitor: IProgressMonitor) -> None:
        if not isinstance(monitor, IProgressMonitor):  # the binding accepts only its interface's subclasses
            raise TypeError("progress_monitor must be a tensorrt.IProgressMonitor")
        calls.append(("IBuilderConfig.progress_monitor", type(monitor).__name__))
        self._monitor = monitor

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        calls.append(("IBuilderConfig.set_memory_pool_limit", pool, pool_size))

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        calls.append(("IBuilderConfig.add_optimization_profile",))
        for low, opt, high in profile.shapes.values():
            if not (len(low) == len(opt) == len(high)) or any(
                not a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
            ):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        calls.append(("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache)))
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        calls.append(("IBuilderConfig.set_timing_cache", ignore_mismatch))
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        calls.append(("Builder",))

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        calls.append(("Builder.create_network", flags))
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        calls.append(("Builder.build_serialized_network",))
        monitor = config.progress_monitor
        if monitor is not None:  # as TensorRT reports a build: a phase with a nested one
            monitor.phase_start("Building engine", None, 2)  # type: ignore[attr-defined]
            monitor.phase_start("Timing tactics", "Building engine", 3)  # type: ignore[attr-defined]
            for step in range(3):
                monitor.step_complete("Timing tactics", step)  # type: ignore[attr-defined]
            monitor.phase_finish("Timing tactics")  # type: ignore[attr-defined]
            monitor.step_complete("Building engine", 1)  # type: ignore[attr-defined]
            monitor.phase_finish("Building engine")  # type: ignore[attr-defined]
        if behaviour.build_fails:
            return None
        for profile in config.profiles:  # every dynamic input needs a range in every profile
            for tensor in network.inputs:
                if any(isinstance(d, str) for d in tensor.shape) and tensor.name not in profile.shapes:
                    return None
        if config.timing_cache is not None:
            config.timing_cache.data += b"timed;"
        plan = {
            "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))),
            "io": [
                [t.name, mode.name, t.dtype.name, list(t.shape)]
                for mode, tensors in ((TensorIOMode.INPUT, network.inputs), (TensorIOMode.OUTPUT, network.outputs))
                for t in tensors
            ],
            "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
        }
        return IHostMemory(b"FAKEPLAN" + json.dumps(plan).encode())


class ICudaEngine:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self._io = {name: (TensorIOMode[mode], DataType[dtype], dims) for name, mode, dtype, dims in plan["io"]}
        self._names = [name for name, *_ in plan["io"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.plan["profiles"][profile_index][name]]

    def create_execution_context(self) -> IExecutionContext:
        calls.append(("ICudaEngine.create_execution_context",))
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        calls.append(("IExecutionContext.set_optimization_profile_async", profile_index, stream_handle))
        self.profile = profile_index
        return 0 <= profile_index < self.engine.num_optimization_profiles

    def set_input_shape(self, name: str, shape: Any) -> bool:
        calls.append(("IExecutionContext.set_input_shape", name, tuple(shape)))
        low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(low) or any(not a <= d <= b for d, a, b in zip(shape, low, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """An output's shape from its ONNX dims, named dims resolved from the input shapes set."""
        sizes: dict[str, int] = {}
        for input_name, shape in self.shapes.items():
            for dim, size in zip(self.engine._io[input_name][2], shape, strict=True):
                if isinstance(dim, str):
                    sizes[dim] = size
        return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in self.engine._io[name][2])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        calls.append(("IExecutionContext.set_tensor_address", name, memory))
        self.addresses[name] = memory
        return name in self.engine._io

    def execute_async_v3(self, stream_handle: int) -> bool:
        calls.append(("IExecutionContext.execute_async_v3", stream_handle))
        inputs = {n for n, (mode, _, _) in self.engine._io.items() if mode is TensorIOMode.INPUT}
        ready = inputs <= set(self.shapes) and set(self.engine._io) <= set(self.addresses)
        if ready and behaviour.compute is not None:
            import ctypes
            import math

            feed = {}
            for name in inputs:
                dtype = np.dtype(_NUMPY[self.engine._io[name][1].name])
                size = math.prod(self.shapes[name]) * dtype.itemsize
                raw = (ctypes.c_char * size).from_address(self.addresses[name])
                feed[name] = np.frombuffer(raw, dtype=dtype).reshape(self.shapes[name]).copy()
            for name, array in behaviour.compute(feed).items():
                expected = self.get_tensor_shape(name)
                array = np.ascontiguousarray(array, dtype=_NUMPY[self.engine._io[name][1].name])
                assert array.shape == expected, (name, array.shape, expected)
                ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
        if ready and behaviour.fill_outputs is not None:
            import ctypes
            import math

            for name, (mode, dtype, _) in self.engine._io.items():
                if mode is TensorIOMode.OUTPUT:
                    size = math.prod(self.get_tensor_shape(name)) * _ITEMSIZE[dtype.name]
                    ctypes.memset(self.addresses[name], behaviour.fill_outputs, size)
        return ready


class Runtime:
    def __init__(self, logger: Logger) -> None:
        calls.append(("Runtime",))

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        calls.append(("Runtime.deserialize_cuda_engine",))
        if behaviour.deserialize == "raise":
            raise RuntimeError("Serialization assertion failed: magic tag mismatch")
        data = bytes(serialized_engine)
        if behaviour.deserialize == "none" or not data.startswith(b"FAKEPLAN"):
            return None  # TensorRT logs an error and returns None for a plan it cannot read
        return ICudaEngine(json.loads(data[len(b"FAKEPLAN") :]))
