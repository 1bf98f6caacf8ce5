"""Binding torch tensors to an engine and running it, against the stand-in `tensorrt` module, on CPU tensors.

The bindings (which tensor, dtype and shape each engine name gets) are computed apart from the calls on the
execution context, so both are checked here without a GPU: the call sequence TensorRT documents
(`set_input_shape` for every input, then `set_tensor_address` with each tensor's `data_ptr()`, then
`execute_async_v3` with torch's current stream handle), and, with the stand-in writing a byte pattern through
the bound output addresses, that the backend reads its logits and scatters its new K/V from exactly that memory.
These are not evidence that it runs on TensorRT: `python -m ernie_serve.testing.gpu_check tensorrt` is.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ernie_serve.backends.tensorrt import build, kv_plan, runtime
from ernie_serve.backends.tensorrt.backend import TensorRTBackend, profile_limits
from ernie_serve.backends.tensorrt.kv_plan import slots_of
from ernie_serve.core.plan import ScheduledRequest, StepPlan

STREAM = 0x5EED


@pytest.fixture()
def engine(trt, tiny_graph, small_profiles, tmp_path):
    config, graph = tiny_graph
    plan = build.build_engine(trt, trt.Logger(), graph, small_profiles(config), tmp_path / "timing", 1 << 20)
    return config, trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)


def _feed(config, batch: int, seq: int, past: int) -> dict[str, torch.Tensor]:
    kv = (batch, config.num_key_value_heads, past, config.head_dim)
    feed = {
        "input_ids": torch.zeros(batch, seq, dtype=torch.long),
        "position_ids": torch.zeros(batch, seq, dtype=torch.long),
        "attention_bias": torch.zeros(batch, seq, past + seq, dtype=torch.float64),  # converted to float32
        "logits_index": torch.zeros(batch, dtype=torch.long),
    }
    for layer in range(config.num_hidden_layers):
        feed[f"past_key_{layer}"] = torch.zeros(kv)
        feed[f"past_value_{layer}"] = torch.zeros(kv).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    return feed


def _outputs(config, batch: int, seq: int) -> dict[str, torch.Tensor]:
    outputs = {"logits": torch.empty(batch, config.vocab_size)}
    for layer in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            outputs[f"new_{kind}_{layer}"] = torch.empty(batch, config.num_key_value_heads, seq, config.head_dim)
    return outputs


def test_bindings_convert_inputs_and_check_every_name_and_range(trt, engine) -> None:
    config, eng = engine
    specs = runtime.tensor_specs(trt, eng)
    bound = runtime.bindings(specs, 1, _feed(config, 3, 1, 10), _outputs(config, 3, 1))
    assert {b.name for b in bound} == set(specs)
    assert [b.is_input for b in bound] == sorted((b.is_input for b in bound), reverse=True)  # inputs first
    by_name = {b.name: b for b in bound}
    assert by_name["attention_bias"].tensor.dtype == torch.float32  # the engine's dtype
    assert by_name["past_value_0"].tensor.is_contiguous()
    with pytest.raises(runtime.BindingError, match=r"input_ids of shape \[3, 2\] is outside profile 1"):
        runtime.bindings(specs, 1, _feed(config, 3, 2, 10), _outputs(config, 3, 2))  # two tokens: not decode
    with pytest.raises(
        runtime.BindingError,
        match=r"attention_bias of shape \[3, 1, 66\] is outside profile 1: \[1, 1, 2\]..\[8, 1, 65\]",
    ):
        runtime.bindings(specs, 1, _feed(config, 3, 1, 65), _outputs(config, 3, 1))
    feed = _feed(config, 3, 1, 10)
    del feed["logits_index"]
    with pytest.raises(runtime.BindingError, match=r"not given: \['logits_index'\]"):
        runtime.bindings(specs, 1, feed, _outputs(config, 3, 1))
    wrong = _outputs(config, 3, 1) | {"logits": torch.empty(3, config.vocab_size, dtype=torch.bfloat16)}
    with pytest.raises(runtime.BindingError, match="output logits must be a contiguous torch.float32"):
        runtime.bindings(specs, 1, _feed(config, 3, 1, 10), wrong)


def test_launch_sets_shapes_then_addresses_then_executes_on_the_stream(trt, engine) -> None:
    config, eng = engine
    specs = runtime.tensor_specs(trt, eng)
    context = eng.create_execution_context()
    assert context.set_optimization_profile_async(1, STREAM)
    bound = runtime.bindings(specs, 1, _feed(config, 2, 1, 7), _outputs(config, 2, 1))
    trt.calls.clear()
    runtime.launch(context, bound, STREAM)
    kinds = [c[0].split(".")[-1] for c in trt.calls]
    inputs = [b for b in bound if b.is_input]
    assert kinds == ["set_input_shape"] * len(inputs) + ["set_tensor_address"] * len(bound) + ["execute_async_v3"]
    assert trt.calls[: len(inputs)] == [("IExecutionContext.set_input_shape", b.name, b.shape) for b in inputs]
    addresses = [c[1:] for c in trt.calls if c[0] == "IExecutionContext.set_tensor_address"]
    assert addresses == [(b.name, b.tensor.data_ptr()) for b in bound]
    assert trt.calls[-1] == ("IExecutionContext.execute_async_v3", STREAM)


def test_launch_refuses_an_output_of_another_shape(trt, engine) -> None:
    config, eng = engine
    specs = runtime.tensor_specs(trt, eng)
    context = eng.create_execution_context()
    context.set_optimization_profile_async(1, STREAM)
    outputs = _outputs(config, 2, 1) | {"new_key_0": torch.empty(2, config.num_key_value_heads, 2, config.head_dim)}
    bound = runtime.bindings(specs, 1, _feed(config, 2, 1, 7), outputs)
    with pytest.raises(
        runtime.BindingError, match=r"output new_key_0: the engine writes \[2, 2, 1, 16\], bound \[2, 2, 2, 16\]"
    ):
        runtime.launch(context, bound, STREAM)


def _backend(trt, engine, monkeypatch) -> TensorRTBackend:
    """A backend as `load` leaves it, on the CPU: the stand-in engine, one context per profile, a CPU pool."""
    config, eng = engine
    backend = TensorRTBackend()
    backend.config, backend.device, backend.engine = config, torch.device("cpu"), eng
    backend.specs = runtime.tensor_specs(trt, eng)
    backend.limits = [profile_limits(backend.specs, p) for p in range(eng.num_optimization_profiles)]
    for index in range(eng.num_optimization_profiles):
        context = eng.create_execution_context()
        context.set_optimization_profile_async(index, STREAM)
        backend.contexts.append(context)
    backend.allocate_kv_cache(num_blocks=12, block_size=4)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=STREAM))
    return backend


def test_execute_runs_decode_and_prefill_profiles_and_scatters_what_the_engine_wrote(trt, engine, monkeypatch) -> None:
    config, _ = engine
    backend = _backend(trt, engine, monkeypatch)
    assert backend.limits == [kv_plan.ProfileLimits(4, 16, 32), kv_plan.ProfileLimits(8, 1, 64)]
    assert backend.pool.shape == (config.num_hidden_layers, 2, 48, config.num_key_value_heads, config.head_dim)
    trt.behaviour.fill_outputs = 0x3F
    pattern = torch.tensor([0x3F3F3F3F], dtype=torch.int32).view(torch.float32).item()
    plan = StepPlan(
        [
            ScheduledRequest("a", [5, 6, 7, 8, 9, 10], 0, [3, 1], is_new=True, samples=True),  # a prompt
            ScheduledRequest("b", [4], 5, [6, 2], is_new=True, samples=True),  # one token after a prefix hit
            ScheduledRequest(
                "c", [1, 2, 3, 4, 5], 0, [7, 8], is_new=True, samples=False
            ),  # a chunk that does not sample
        ]
    )
    logits = backend.execute(plan)
    assert logits.shape == (2, config.vocab_size) and logits.dtype == torch.float32
    assert (logits == pattern).all()  # read from the memory bound as `logits`
    shapes = {c[1]: c[2] for c in trt.calls if c[0] == "IExecutionContext.set_input_shape"}
    assert shapes["input_ids"] == (2, 6)  # the prefill run (a and c) was bound last
    executions = [c for c in trt.calls if c[0] == "IExecutionContext.execute_async_v3"]
    assert executions == [("IExecutionContext.execute_async_v3", STREAM)] * 2  # decode run, then prefill run
    # the new tokens' slots hold what the engine wrote; every other slot is still zero
    new_slots = (
        slots_of([3, 1], 0, 6, 4).tolist() + slots_of([6, 2], 5, 6, 4).tolist() + slots_of([7, 8], 0, 5, 4).tolist()
    )
    written = (backend.pool != 0).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()
    assert written == sorted(new_slots)
    assert (backend.pool[:, :, new_slots] == pattern).all()
    assert backend.num_cached_requests == 3
    backend.release(["a", "b", "c", "unknown"])
    assert backend.num_cached_requests == 0


def test_a_continuing_request_must_have_been_new(trt, engine, monkeypatch) -> None:
    backend = _backend(trt, engine, monkeypatch)
    with pytest.raises(RuntimeError, match="never new or was released"):
        backend.execute(StepPlan([ScheduledRequest("x", [1], 3, [], is_new=False, samples=True)]))


def test_load_builds_once_then_loads_with_a_context_per_profile(
    trt, tiny_graph, small_profiles, tmp_path, monkeypatch
) -> None:
    """`load` end to end on the stand-in, with the CUDA calls and the TensorRT-flavour graph writer replaced."""
    import shutil

    from ernie_serve.backends.tensorrt import backend as trt_backend
    from ernie_serve.backends.tensorrt.backend import TensorRTOptions
    from ernie_serve.backends.tensorrt.cache import Target
    from ernie_serve.core.backend import BackendConfigError
    from ernie_serve.core.config import EngineSettings

    config, graph = tiny_graph

    def write_graph(model_config, weights_path, seed, dtype, out_dir):
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copy(graph.parent / name, out_dir / name)
        return out_dir / "model.onnx"

    monkeypatch.setattr(build, "write_graph", write_graph)
    linted: list[int] = []  # lint.py comes with the graph side of the backend; its findings are only logged
    monkeypatch.setattr(build, "lint_problems", lambda path, profiles: linted.append(len(profiles)) or ["a problem"])
    monkeypatch.setattr(trt_backend, "engine_profiles", lambda model_config, settings: small_profiles(model_config))
    monkeypatch.setattr(trt_backend, "current_target", lambda trt, device: Target("10.13.0", "H200", (9, 0), "12.8"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    stream = SimpleNamespace(cuda_stream=STREAM, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    settings = EngineSettings(device="cuda", dtype="float32")
    options = TensorRTOptions(tensorrt_cache_dir=str(tmp_path))
    first = TensorRTBackend()
    first.load(config, settings, None, options)
    assert "Builder.build_serialized_network" in [c[0] for c in trt.calls]
    profiles_set = [c[1:] for c in trt.calls if c[0] == "IExecutionContext.set_optimization_profile_async"]
    assert profiles_set == [(0, STREAM), (1, STREAM)] and len(first.contexts) == 2
    assert [c.profile for c in first.contexts] == [0, 1]
    assert first.limits == [kv_plan.ProfileLimits(4, 16, 32), kv_plan.ProfileLimits(8, 1, 64)]
    assert first.weight_bytes["engine"] == len(next(tmp_path.glob("*/engine.plan")).read_bytes())
    trt.calls.clear()
    second = TensorRTBackend()
    second.load(config, settings, None, options)  # from the cache: deserialized, not built
    assert "Builder" not in [c[0] for c in trt.calls] and "Runtime.deserialize_cuda_engine" in [c[0] for c in trt.calls]
    with pytest.raises(BackendConfigError, match="--device cpu: the tensorrt backend runs on a CUDA GPU"):
        TensorRTBackend().load(config, EngineSettings(device="cpu"), None, options)
