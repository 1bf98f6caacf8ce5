"""The onnx backend in the engine: providers, availability, per-request caches under continuous batching,
preemption, and the memory bound."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ernie_serve.backends.onnx.backend import OnnxBackend, OnnxOptions, resolve_providers
from ernie_serve.core.backend import BackendUnavailableError

CPU = ["CPUExecutionProvider"]


def test_registered_as_a_builtin_plugin() -> None:
    from ernie_serve.core.plugins import get_backend_class

    assert get_backend_class("onnx") is OnnxBackend


def test_availability_names_the_extra_when_onnxruntime_is_missing(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    assert OnnxBackend.availability() == "onnxruntime not installed: pip install 'ernie-serve[onnx]'"


def test_capabilities_and_options_are_declared_on_the_class() -> None:
    assert OnnxBackend.capabilities.prefix_caching is False  # one cache per request
    assert OnnxBackend.capabilities.devices == ("cpu", "cuda")
    assert OnnxBackend.capabilities.quantization == ("wint8", "wint4")
    assert not OnnxBackend.capabilities.tensor_parallel
    assert OnnxBackend.options_class is OnnxOptions
    assert set(OnnxOptions.model_fields) == {
        "onnx_providers",
        "onnx_quantize_lm_head",
        "onnx_weight_only",
        "onnx_graph_flavour",
    }


def test_provider_option_splits_commas_from_flags_and_env(monkeypatch) -> None:
    monkeypatch.delenv("ERNIE_SERVE_ONNX_PROVIDERS", raising=False)
    assert OnnxOptions().onnx_providers is None
    assert OnnxOptions(onnx_providers=["cuda,cpu", " tensorrt "]).onnx_providers == ["cuda", "cpu", "tensorrt"]
    assert OnnxOptions(onnx_providers=" , ").onnx_providers is None
    monkeypatch.setenv("ERNIE_SERVE_ONNX_PROVIDERS", "trt,cuda")
    assert OnnxOptions().onnx_providers == ["trt", "cuda"]
    assert OnnxOptions(onnx_providers="cpu").onnx_providers == ["cpu"]  # a given value beats the environment


def test_provider_names_aliases_and_fallback() -> None:
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, "auto", CPU) == CPU
    assert resolve_providers(None, "cpu", gpu) == CPU
    assert resolve_providers(None, "auto", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["trt", "cuda"], "auto", gpu) == gpu
    assert resolve_providers(["CPUExecutionProvider"], "auto", gpu) == CPU
    assert resolve_providers(["cuda", "cpu", "tensorrt", "cuda"], "auto", gpu) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
        "TensorrtExecutionProvider",
    ]


@pytest.mark.parametrize(
    ("requested", "hint"),
    [("cuda", "pip install onnxruntime-gpu"), ("tensorrt", "and TensorRT"), ("OpenVINOExecutionProvider", "build")],
)
def test_an_unavailable_provider_is_one_clear_error(requested: str, hint: str) -> None:
    with pytest.raises(BackendUnavailableError) as error:
        resolve_providers([requested], "auto", CPU)
    message = str(error.value)
    assert "is not available here" in message and hint in message and "\n" not in message


# ----- in the engine -----

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("moe_shared_tied", torch.bfloat16)


@pytest.fixture(scope="module")
def torch_llm(checkpoint):
    from ernie_serve import LLM

    llm = LLM(model=str(checkpoint), backend="torch", block_size=4)
    yield llm
    llm.engine.close()


def _greedy(llm, prompts, max_tokens=6):
    from ernie_serve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _onnx_llm(checkpoint, **settings):
    from ernie_serve import LLM

    return LLM(model=str(checkpoint), backend="onnx", block_size=4, **settings)


def test_requests_join_and_leave_every_step_and_caches_are_freed(checkpoint, torch_llm) -> None:
    from ernie_serve import SamplingParams

    llm = _onnx_llm(checkpoint, max_num_batched_tokens=16)
    engine, backend = llm.engine, llm.engine.core.backend
    assert not engine.core.scheduler.config.enable_prefix_caching  # turned off by the engine for this backend
    prompts = [list(range(10, 10 + n)) for n in (3, 17, 5, 30, 2)]
    lengths = [2, 9, 5, 3, 7]
    expected = [_greedy(torch_llm, [p], m)[0] for p, m in zip(prompts, lengths, strict=True)]

    got: dict[str, list[int]] = {}
    pending = list(zip(prompts, lengths, strict=True))
    ids: list[str] = []
    held = []
    while pending or engine.has_unfinished_requests():
        if pending:  # a new request joins at every step while others run and leave
            prompt, length = pending.pop(0)
            ids.append(engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)))
        for output in engine.step():
            if output.finished:
                got[output.request_id] = output.outputs[0].token_ids
        held.append(backend.num_cached_requests)
        for request_id, cache in backend._caches.items():
            request = engine.core.scheduler.requests.get(request_id)
            if request is not None:  # the block manager's grant bounds each cache
                assert cache.length <= cache.data.shape[3] <= len(request.block_ids) * 4
    assert [got[i] for i in ids] == expected
    assert max(held) >= 3
    assert backend.num_cached_requests == 0  # each released as it finished
    llm.engine.close()


def test_decode_slots_grow_shrink_and_follow_requests_joining_and_leaving(checkpoint, torch_llm) -> None:
    """Decoding requests keep their past KV in slots between steps (`_DecodeSlots`): a long request makes the
    slots' past axis grow past `SLOT_POSITIONS` twice, shorter ones join while it decodes, it leaves first and
    the axis shrinks; every request's tokens still equal decoding it alone. The slots' buffers outlive the
    requests: the same work again lays its slots out in them, over the earlier runs' keys and values, with the
    same tokens, and by its third run allocates no buffer."""
    from ernie_serve import SamplingParams
    from ernie_serve.backends.onnx.backend import SLOT_POSITIONS

    llm = _onnx_llm(checkpoint)
    engine, backend = llm.engine, llm.engine.core.backend
    long_prompt = [10 + i % 90 for i in range(2 * SLOT_POSITIONS - 20)]  # decodes past 2 * SLOT_POSITIONS
    work = [(long_prompt, 30), (list(range(40, 45)), 45), (list(range(60, 66)), 40), (list(range(70, 73)), 35)]
    expected = [_greedy(torch_llm, [p], m)[0] for p, m in work]
    joins = {0: work[0], 1: work[1], 8: work[2], 20: work[3]}  # step -> request joining then

    def run() -> list[tuple[int, bool]]:
        ids, got, capacities = [], {}, []
        step = 0
        while step in joins or step < max(joins) or engine.has_unfinished_requests():
            if step in joins:
                prompt, length = joins[step]
                params = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
                ids.append(engine.add_request(prompt, params))
            for output in engine.step():
                if output.finished:
                    got[output.request_id] = output.outputs[0].token_ids
            if backend._slots.ids:
                capacities.append((backend._slots.capacity, ids[0] in got))
            step += 1
        assert [got[i] for i in ids] == expected
        return capacities

    capacities = run()
    assert max(c for c, _ in capacities) == 3 * SLOT_POSITIONS  # grew twice while the long request decoded
    assert capacities[-1] == (SLOT_POSITIONS, True)  # shrank once it had left
    assert backend._slots.ids == [] and backend._slots.data.size == 0  # no layout once the last request left
    kept = backend._slots._buffers
    assert all(buffer.size for buffer in kept) and all(np.any(buffer != 0) for buffer in kept)  # old keys, values
    assert run() == capacities  # the layouts alternate buffers: this run can grow the one the largest did not use
    kept = backend._slots._buffers
    assert run() == capacities
    assert {id(buffer) for buffer in backend._slots._buffers} == {id(buffer) for buffer in kept}  # no new buffer
    llm.engine.close()


def test_preempted_requests_recompute_and_match(checkpoint, torch_llm) -> None:
    # 12 blocks of 4 tokens cannot hold three 10-token prompts growing to 24 tokens: the scheduler preempts.
    llm = _onnx_llm(checkpoint, num_gpu_blocks_override=12, max_model_len=48)
    prompts = [list(range(20 + i, 30 + i)) for i in range(3)]
    assert _greedy(llm, prompts, 14) == _greedy(torch_llm, prompts, 14)
    assert llm.engine.core.scheduler.num_preemptions > 0
    llm.engine.close()


def test_a_prefix_cache_hit_is_refused_clearly(checkpoint) -> None:
    from ernie_serve.core.plan import ScheduledRequest, StepPlan

    llm = _onnx_llm(checkpoint)
    plan = StepPlan([ScheduledRequest("r", [5, 6], start_position=4, new_block_ids=[0, 1], is_new=True, samples=True)])
    with pytest.raises(RuntimeError, match="prefix caching must be off"):
        llm.engine.core.backend.execute(plan)
    llm.engine.close()


def test_a_step_without_sampling_rows_returns_no_logits(checkpoint) -> None:
    from ernie_serve.core.plan import ScheduledRequest, StepPlan

    llm = _onnx_llm(checkpoint)
    plan = StepPlan([ScheduledRequest("r", [5, 6, 7], start_position=0, new_block_ids=[0], is_new=True, samples=False)])
    logits = llm.engine.core.backend.execute(plan)
    assert logits.shape == (0, llm.engine.model_config.vocab_size) and logits.dtype == torch.float32
    llm.engine.close()


def test_a_float32_only_graph_refuses_other_dtypes(checkpoint) -> None:
    with pytest.raises(ValueError, match="--dtype bfloat16: the onnx backend's graph computes in float32"):
        _onnx_llm(checkpoint, dtype="bfloat16")


def test_providers_from_the_environment_and_from_backend_options(checkpoint, monkeypatch) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setenv("ERNIE_SERVE_ONNX_PROVIDERS", "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        _onnx_llm(checkpoint)
    llm = _onnx_llm(checkpoint, backend_options={"onnx_providers": "cpu"})  # the user's value beats the env
    assert llm.engine.core.backend.session.get_providers() == CPU
    llm.engine.close()
    monkeypatch.setenv("ERNIE_SERVE_ONNX_PROVIDERS", "cpu")
    llm = _onnx_llm(checkpoint)
    assert llm.engine.core.backend.session.get_providers() == CPU
    llm.engine.close()


def test_caches_are_freed_when_requests_end_even_if_the_engine_goes_idle(checkpoint) -> None:
    from ernie_serve import SamplingParams

    llm = _onnx_llm(checkpoint)
    backend = llm.engine.core.backend
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert backend.num_cached_requests == 0  # no further step ran, yet the cache is gone
    engine = llm.engine
    request_id = engine.add_request([8, 9, 10], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert backend.num_cached_requests == 1
    engine.abort_request(request_id)
    assert backend.num_cached_requests == 0
