"""The backend contract, driven without the engine: each built-in backend gets plans from the real scheduler,
keeps block tables from `is_new` + `new_block_ids`, starts afresh on `is_new`, and drops state on `release`
only. The driver below does what the engine does between steps (release preempted and ended requests)."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.core.backend import Backend
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.plan import SampledToken, ScheduledRequest, StepPlan, StepResult
from ernie_serve.core.plugins import get_backend_class
from ernie_serve.core.request import Request
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.core.scheduler import FCFSScheduler, SchedulerConfig
from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import load_reference, reference_greedy

BLOCK_SIZE = 4
PROMPTS = [[5, 6, 7], list(range(10, 31)), [100] * 9 + [7, 8], [300, 301]]
NEW_TOKENS = 8


def _backend_names() -> list[str]:
    names = ["torch"]
    try:
        import onnxruntime  # noqa: F401

        names.append("onnx")
    except ImportError:
        pass
    return names


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("moe_shared_tied", torch.bfloat16)


@pytest.fixture(scope="module", params=_backend_names())
def backend(request, checkpoint):
    """A loaded backend with a pool of 64 blocks (tests use a part of it through the scheduler's config)."""
    backend_cls = get_backend_class(request.param)
    instance: Backend = backend_cls()
    settings = EngineSettings(model=str(checkpoint), backend=request.param, block_size=BLOCK_SIZE, device="cpu")
    instance.load(read_model_config(checkpoint), settings, str(checkpoint), backend_cls.options_class())
    instance.allocate_kv_cache(64, BLOCK_SIZE)
    yield instance
    instance.close()


def _greedy_run(backend: Backend, num_blocks: int) -> tuple[dict[str, list[int]], int]:
    """PROMPTS through the scheduler and `backend` with a pool of `num_blocks`; (tokens per request,
    preemptions). Released exactly as the engine does: preempted ones before the step, ended ones after."""
    scheduler = FCFSScheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=24,
            max_model_len=num_blocks * BLOCK_SIZE,
            block_size=BLOCK_SIZE,
            num_blocks=num_blocks,
            enable_prefix_caching=backend.capabilities.prefix_caching,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(f"r{i}-{num_blocks}", list(p), params) for i, p in enumerate(PROMPTS)]
    for request in requests:
        scheduler.add_request(request)
    for _ in range(1000):
        if not scheduler.has_unfinished_requests():
            break
        plan = scheduler.schedule()
        backend.release(plan.preempted_request_ids)
        logits = backend.execute(plan)  # [S, V]
        sampled = {
            rid: SampledToken(int(t)) for rid, t in zip(plan.sampling_request_ids, logits.argmax(-1), strict=True)
        }
        finished = scheduler.update(plan, StepResult(sampled))
        backend.release([r.request_id for r in finished])
    assert not scheduler.has_unfinished_requests()
    return {r.request_id.split("-")[0]: r.output_token_ids for r in requests}, scheduler.num_preemptions


def test_preempted_requests_rerun_from_scratch_give_the_reference_tokens(backend, checkpoint) -> None:
    # 10 blocks for requests needing 19 together: preemption, readmission with other blocks, tables that
    # grow by one block at a time during decode.
    tight, preemptions = _greedy_run(backend, num_blocks=10)
    assert preemptions > 0
    reference = load_reference(checkpoint)
    assert tight == {f"r{i}": reference_greedy(reference, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)}
    assert backend.num_cached_requests == 0  # every request was released as it ended


def test_is_new_starts_a_request_afresh_even_without_a_release(backend) -> None:
    """A backend must not carry anything over into an `is_new` step, whatever it still holds."""

    def first_logits(request_id: str, tokens: list[int], blocks: list[int]) -> torch.Tensor:
        plan = StepPlan([ScheduledRequest(request_id, tokens, 0, blocks, is_new=True, samples=True)])
        return backend.execute(plan)

    fresh = first_logits("fresh", [40, 41, 42, 43, 44], [10, 11])
    backend.release(["fresh"])
    first_logits("r", [7, 8, 9, 10, 11, 12], [12, 13])
    step = StepPlan([ScheduledRequest("r", [13], 6, [], is_new=False, samples=True)])
    backend.execute(step)  # "r" has state now: 7 positions
    again = first_logits("r", [40, 41, 42, 43, 44], [14, 15])
    torch.testing.assert_close(again, fresh, rtol=0, atol=1e-5)
    backend.release(["r"])
    assert backend.num_cached_requests == 0


def test_a_request_that_continues_without_being_new_is_an_error(backend) -> None:
    plan = StepPlan([ScheduledRequest("ghost", [5], 3, [], is_new=False, samples=True)])
    with pytest.raises(RuntimeError, match="'ghost' continues, but it was never new or was released"):
        backend.execute(plan)
    backend.release(["ghost", "never-seen"])  # unknown ids: a no-op


def test_release_is_the_only_end_of_state(backend) -> None:
    plan = StepPlan([ScheduledRequest("kept", [5, 6, 7], 0, [20], is_new=True, samples=True)])
    backend.execute(plan)
    # a plan that mentions the request as preempted is information for the engine, not a release
    backend.execute(StepPlan([ScheduledRequest("other", [9], 0, [21], is_new=True, samples=True)], ["kept"]))
    assert backend.num_cached_requests == 2
    backend.execute(StepPlan([ScheduledRequest("kept", [8], 3, [], is_new=False, samples=True)]))
    backend.release(["kept", "other"])
    assert backend.num_cached_requests == 0
