"""The engine on a real tiny checkpoint: the same greedy tokens whatever the scheduling, prefix reuse, abort."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.core import plugins

FAULTS = Path(__file__).resolve().parent / "faults"  # backends registered only in tests

PROMPTS = [list(range(10, 10 + n)) for n in (3, 17, 40, 64, 9, 31)]
PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 5, 20, 8, 16, 10)]


def _tokens(llm: LLM, prompts=PROMPTS, params=PARAMS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint("moe_shared_tied", torch.float32))


@pytest.fixture(scope="module")
def baseline(checkpoint) -> list[list[int]]:
    llm = LLM(model=checkpoint, block_size=4)
    return [_tokens(llm, [p], [s])[0] for p, s in zip(PROMPTS, PARAMS, strict=True)]  # each request alone


@pytest.mark.parametrize(
    "settings",
    [
        dict(enable_chunked_prefill=True, max_num_batched_tokens=16),
        dict(enable_chunked_prefill=False, max_num_batched_tokens=256),
        dict(enable_prefix_caching=False),
        dict(enable_prefix_caching=True),
        dict(num_gpu_blocks_override=24),  # 96 tokens of KV for ~250 needed: forces preemption
        dict(max_num_seqs=2),
        dict(scheduler="priority"),
    ],
    ids=["chunked", "unchunked", "no-prefix-cache", "prefix-cache", "preemption", "two-seqs", "priority"],
)
def test_greedy_outputs_do_not_depend_on_scheduling(checkpoint, baseline, settings) -> None:
    llm = LLM(model=checkpoint, block_size=4, **settings)
    assert _tokens(llm) == baseline
    if "num_gpu_blocks_override" in settings:
        assert llm.engine.core.scheduler.stats().num_preemptions > 0
    bm = llm.engine.core.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_shared_system_prompt_is_computed_once(checkpoint) -> None:
    llm = LLM(model=checkpoint, block_size=4)
    system = list(range(100, 160))
    first = llm.generate({"prompt_token_ids": system + [5, 6]}, SamplingParams(temperature=0, max_tokens=3))[0]
    second = llm.generate({"prompt_token_ids": system + [7, 8, 9]}, SamplingParams(temperature=0, max_tokens=3))[0]
    assert first.metrics["num_cached_tokens"] == 0
    assert second.metrics["num_cached_tokens"] == len(system)  # 60 = 15 full blocks of 4
    stats = llm.engine.core.scheduler.stats()
    assert stats.prefix_cache_hits == len(system) and stats.prefix_cache_queries == 62 + 63

    uncached = LLM(model=checkpoint, block_size=4, enable_prefix_caching=False)
    again = uncached.generate({"prompt_token_ids": system + [7, 8, 9]}, SamplingParams(temperature=0, max_tokens=3))
    assert again[0].outputs[0].token_ids == second.outputs[0].token_ids


def test_reset_prefix_cache_makes_the_next_prompt_compute_whole(checkpoint) -> None:
    """`LLM.reset_prefix_cache` (vLLM's): refused while a request runs, then the same prompt is computed
    whole and gives the same tokens; the hit counters keep counting."""
    llm = LLM(model=checkpoint, block_size=4)
    prompt = {"prompt_token_ids": list(range(100, 140))}
    params = SamplingParams(temperature=0, max_tokens=3)
    first = llm.generate(prompt, params)[0]
    assert llm.generate(prompt, params)[0].metrics["num_cached_tokens"] == 36  # 9 full blocks of 4
    llm.engine.add_request(list(range(10, 20)), SamplingParams(max_tokens=2))
    assert not llm.reset_prefix_cache()  # a request is unfinished
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache()
    after = llm.generate(prompt, params)[0]
    assert after.metrics["num_cached_tokens"] == 0
    assert after.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.core.scheduler.stats().prefix_cache_hits == 36


def test_abort_frees_blocks_in_any_state(checkpoint) -> None:
    llm = LLM(model=checkpoint, block_size=4, max_num_seqs=1)
    engine = llm.engine
    running = engine.add_request(list(range(10, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    waiting = engine.add_request(list(range(40, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    kept = engine.add_request(list(range(70, 75)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request([running, waiting])
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert finished[running].outputs[0].finish_reason == "abort"
    assert finished[waiting].outputs[0].finish_reason == "abort"
    assert finished[waiting].outputs[0].token_ids == []
    assert finished[kept].outputs[0].finish_reason == "length"
    bm = engine.core.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_request_larger_than_the_pool_fails_clearly(checkpoint) -> None:
    with pytest.raises(ValueError, match="--max-model-len 64 needs 16 KV blocks but the pool holds 8"):
        LLM(model=checkpoint, block_size=4, num_gpu_blocks_override=8, max_model_len=64)
    llm = LLM(model=checkpoint, block_size=4, num_gpu_blocks_override=8)  # context capped to the pool: 32
    assert llm.engine.max_model_len == 32
    with pytest.raises(ValueError, match="maximum context length is 32"):
        llm.generate({"prompt_token_ids": list(range(10, 40))}, SamplingParams(max_tokens=8))


def test_a_large_devices_kv_pool_is_capped_at_what_the_sequences_can_fill(checkpoint, monkeypatch) -> None:
    """On a large GPU, free memory would give a tiny model hundreds of millions of KV blocks (and the block
    manager a list of them): the pool stops at `max_num_seqs` sequences of the longest context."""
    monkeypatch.syspath_prepend(str(FAULTS))
    plugins.reset_plugin_manager()
    try:
        llm = LLM(model=checkpoint, backend="roomy-device", max_num_seqs=3, max_model_len=40, block_size=4)
        assert llm.engine.core.num_blocks == 3 * 10
        assert _tokens(llm, PROMPTS[:1], PARAMS[:1])  # and it serves
        llm.close()
    finally:
        plugins.reset_plugin_manager()
