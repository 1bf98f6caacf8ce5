"""The backend's whole step path over ernie-serve's paged pool, with onnxruntime computing in place of the engine.

The stand-in `tensorrt` module builds an "engine" from the float32 graph of a tiny checkpoint; its execution
context reads the inputs through the addresses the backend bound, runs the same graph in onnxruntime, and writes
the outputs through the bound output addresses (CPU tensors). Driven by the real scheduler and block manager with
prefix caching on and a pool small enough to preempt, the backend must produce transformers' greedy tokens: this
checks the run grouping, the gather of each sequence's past from its blocks (including blocks shared by a prefix
hit), the bindings and the scatter of new rows. It says nothing about TensorRT itself (its parser, its kernels,
its numerics); `python -m ernie_serve.testing.gpu_check tensorrt` does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ernie_serve.backends.tensorrt import build, runtime
from ernie_serve.backends.tensorrt.backend import TensorRTBackend, profile_limits
from ernie_serve.core.plan import SampledToken, StepResult
from ernie_serve.core.request import Request
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.core.scheduler import FCFSScheduler, SchedulerConfig
from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import load_reference, reference_greedy

ort = pytest.importorskip("onnxruntime")

BLOCK_SIZE = 4
SHARED = list(range(10, 31))  # 21 tokens: five full blocks a later request can hit
PROMPTS = [[5, 6, 7], SHARED, [100] * 9 + [7, 8], [300, 301]]
LATE = SHARED + [200, 201]  # added once SHARED's blocks are cached
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("moe_shared_tied", torch.bfloat16)


@pytest.fixture(scope="module")
def graph(checkpoint, tmp_path_factory):
    from ernie_serve.backends.onnx.export import export_to_dir

    config = read_model_config(checkpoint)
    out = tmp_path_factory.mktemp("trt-parity-graph")
    export_to_dir(config, str(checkpoint), out, check=False)
    return config, out / "model.onnx"


@pytest.fixture()
def backend(trt, graph, small_profiles, tmp_path, monkeypatch) -> TensorRTBackend:
    config, path = graph
    profiles = small_profiles(config, prefill=(4, 24, 64), decode=(8, 64))
    plan = build.build_engine(trt, trt.Logger(), path, profiles, tmp_path / "timing", 1 << 20)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    trt.behaviour.compute = lambda feed: dict(zip(names, session.run(names, feed), strict=True))
    instance = TensorRTBackend()
    instance.config, instance.device, instance.engine = config, torch.device("cpu"), engine
    instance.specs = runtime.tensor_specs(trt, engine)
    instance.limits = [profile_limits(instance.specs, p) for p in range(engine.num_optimization_profiles)]
    for index in range(engine.num_optimization_profiles):
        context = engine.create_execution_context()
        context.set_optimization_profile_async(index, 0)
        instance.contexts.append(context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return instance


def _greedy_run(backend: TensorRTBackend, num_blocks: int) -> tuple[dict[str, list[int]], int, int]:
    """PROMPTS (and LATE, once SHARED has run a few steps) through the scheduler and the backend; (tokens per
    request, preemptions, prefix hits seen as `is_new` steps starting past position 0)."""
    backend.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    scheduler = FCFSScheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=24,
            max_model_len=64,
            block_size=BLOCK_SIZE,
            num_blocks=num_blocks,
            enable_prefix_caching=True,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(f"r{i}", list(p), params) for i, p in enumerate(PROMPTS)]
    for request in requests:
        scheduler.add_request(request)
    hits = 0
    for step in range(1000):
        if step == 4:
            requests.append(Request("late", list(LATE), params))
            scheduler.add_request(requests[-1])
        if step > 4 and not scheduler.has_unfinished_requests():
            break
        plan = scheduler.schedule()
        hits += sum(1 for s in plan.scheduled if s.is_new and s.start_position > 0)
        backend.release(plan.preempted_request_ids)
        logits = backend.execute(plan)  # [S, V]
        sampled = {
            rid: SampledToken(int(t)) for rid, t in zip(plan.sampling_request_ids, logits.argmax(-1), strict=True)
        }
        finished = scheduler.update(plan, StepResult(sampled))
        backend.release([r.request_id for r in finished])
    assert not scheduler.has_unfinished_requests()
    return {r.request_id: r.output_token_ids for r in requests}, scheduler.num_preemptions, hits


def test_greedy_tokens_over_the_paged_pool_with_prefix_hits(backend, checkpoint) -> None:
    tokens, _, hits = _greedy_run(backend, num_blocks=48)
    assert hits > 0  # LATE read SHARED's cached blocks through the gather
    reference = load_reference(checkpoint)
    expected = {f"r{i}": reference_greedy(reference, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)}
    assert tokens == expected | {"late": reference_greedy(reference, LATE, NEW_TOKENS)}
    assert backend.num_cached_requests == 0


def test_greedy_tokens_when_a_small_pool_preempts(backend, checkpoint) -> None:
    tokens, preemptions, _ = _greedy_run(backend, num_blocks=12)
    assert preemptions > 0
    reference = load_reference(checkpoint)
    expected = {f"r{i}": reference_greedy(reference, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)}
    assert tokens == expected | {"late": reference_greedy(reference, LATE, NEW_TOKENS)}
