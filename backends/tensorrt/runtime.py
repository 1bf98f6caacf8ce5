"""Running a deserialized engine on torch tensors, with TensorRT 10's name-based I/O API.

Split in two so that the part that decides what is bound runs anywhere: `bindings` (pure: checks every engine
tensor is given, in the engine's dtype, contiguous, within the profile's shape range, and says which shape and
address each gets) and `launch` (the calls on the execution context: `set_input_shape`, `set_tensor_address`,
`execute_async_v3` on the caller's CUDA stream). `tensor_specs` reads what the engine declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

Shape = tuple[int, ...]


class BindingError(RuntimeError):
    """The tensors for a run do not match what the engine declares (a bug in the backend, or a stale engine)."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor as the engine declares it."""

    name: str
    is_input: bool
    dtype: torch.dtype
    # per optimization profile, (min, opt, max) for inputs; empty for outputs (their shapes follow the inputs')
    profile_shapes: tuple[tuple[Shape, Shape, Shape], ...]


@dataclass(frozen=True)
class Binding:
    """One tensor bound for a run: the engine name, the torch tensor (contiguous, the engine's dtype)."""

    name: str
    tensor: torch.Tensor
    is_input: bool

    @property
    def shape(self) -> Shape:
        return tuple(self.tensor.shape)


def torch_dtype(trt: ModuleType, data_type: Any) -> torch.dtype:
    """The torch dtype of a `trt.DataType` (the ones our graphs use)."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if data_type not in table:
        raise BindingError(f"engine tensor of TensorRT type {data_type}, which the backend does not bind")
    return table[data_type]


def tensor_specs(trt: ModuleType, engine: Any) -> dict[str, TensorSpec]:
    """Every I/O tensor of `engine` by name: mode, dtype and, for inputs, each profile's shape range."""
    specs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shapes: tuple[tuple[Shape, Shape, Shape], ...] = ()
        if is_input:
            shapes = tuple(
                tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, p))  # type: ignore[misc]
                for p in range(engine.num_optimization_profiles)
            )
        specs[name] = TensorSpec(name, is_input, torch_dtype(trt, engine.get_tensor_dtype(name)), shapes)
    return specs


def bindings(
    specs: Mapping[str, TensorSpec],
    profile: int,
    inputs: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
) -> list[Binding]:
    """What one run binds, inputs first: every engine input from `inputs` converted to the engine's dtype and
    made contiguous (the attention bias is built in float32, the KV pool may be bfloat16, ...), and every output
    tensor as given (allocated by the caller in the engine's dtype: the engine writes into it). Raises
    BindingError naming the tensor for a missing or extra name, an output of the wrong dtype or layout, or an
    input shape outside the profile's range."""
    given = set(inputs) | set(outputs)
    missing = sorted(set(specs) - given)
    extra = sorted(given - set(specs))
    if missing or extra:
        raise BindingError(f"engine tensors not given: {missing}; given but not in the engine: {extra}")
    bound = []
    for name, tensor in inputs.items():
        spec = specs[name]
        if not spec.is_input:
            raise BindingError(f"{name} is an engine output, given as an input")
        low, _, high = spec.profile_shapes[profile]
        shape = tuple(tensor.shape)
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            raise BindingError(f"{name} of shape {list(shape)} is outside profile {profile}: {list(low)}..{list(high)}")
        bound.append(Binding(name, tensor.to(spec.dtype).contiguous(), True))
    for name, tensor in outputs.items():
        spec = specs[name]
        if spec.is_input:
            raise BindingError(f"{name} is an engine input, given as an output")
        if tensor.dtype != spec.dtype or not tensor.is_contiguous():
            raise BindingError(f"output {name} must be a contiguous {spec.dtype} tensor, not {tensor.dtype}")
        bound.append(Binding(name, tensor, False))
    return bound


def launch(context: Any, bound: list[Binding], stream_handle: int) -> None:
    """Run the engine once on the CUDA stream `stream_handle` (the caller's current torch stream, so the run is
    ordered after the gather that filled its inputs and before the scatter that reads its outputs, with no
    synchronization). The context must already be set to the run's profile. Shapes first: an output's shape is
    only known once every input shape is set, and is checked against the tensor bound for it."""
    for b in bound:
        if b.is_input and not context.set_input_shape(b.name, b.shape):
            raise BindingError(f"TensorRT refused shape {list(b.shape)} for {b.name}")
    for b in bound:
        if not b.is_input:
            expected = tuple(int(d) for d in context.get_tensor_shape(b.name))
            if expected != b.shape:
                raise BindingError(f"output {b.name}: the engine writes {list(expected)}, bound {list(b.shape)}")
    for b in bound:
        if not context.set_tensor_address(b.name, b.tensor.data_ptr()):
            raise BindingError(f"TensorRT refused the address of {b.name}")
    if not context.execute_async_v3(stream_handle):
        raise RuntimeError("TensorRT execute_async_v3 failed; the TensorRT log above says why")
