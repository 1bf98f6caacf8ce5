"""FCFSScheduler driven by a small simulation: schedule -> a fake backend -> update.

The fake backend keeps a paged "KV cache" (per block slot: the token prefix whose KV it holds) and, as a real
backend must, each request's block table built from `is_new` + `new_block_ids` and dropped on release. It checks
every plan against both, so a wrong block table, a wrong prefix-cache hit or a wrong position fails loudly. The
token it samples depends only on the request id and the sequence length, so outputs are the same whatever the
batching, preemption or pool size.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ernie_serve.core.plan import SampledToken, StepPlan, StepResult
from ernie_serve.core.request import Request, RequestStatus
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.core.scheduler import FCFSScheduler, SchedulerConfig
from ernie_serve.plugins.schedulers import PriorityScheduler

EOS = 2


def config(**overrides) -> SchedulerConfig:
    values = dict(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        block_size=4,
        num_blocks=64,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
    )
    values.update(overrides)
    return SchedulerConfig(**values)


def natural_token(request_id: str, length: int) -> int:
    """The fake model's next token for a sequence of `length` tokens: never EOS, never a prompt-range token."""
    return 1000 + zlib.crc32(f"{request_id}:{length}".encode()) % 1000


@dataclass
class Sim:
    """Schedules, "executes" and updates, checking the plan and the block manager after every step."""

    config: SchedulerConfig
    scripts: dict[str, list[int]] = field(default_factory=dict)  # request id -> forced output tokens
    check_budget: bool = True
    scheduler_cls: type[FCFSScheduler] = FCFSScheduler
    scheduler: FCFSScheduler = field(init=False)
    requests: dict[str, Request] = field(default_factory=dict)
    kv: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)  # (block, slot) -> prefix held
    tables: dict[str, list[int]] = field(default_factory=dict)  # the fake backend's block table per request
    plans: list[StepPlan] = field(default_factory=list)
    room: int | None = None  # the fake device runs out of memory for a step of more tokens than this

    def __post_init__(self) -> None:
        self.scheduler = self.scheduler_cls(self.config)

    def add(
        self, request_id: str, prompt: list[int], script: list[int] | None = None, priority: int = 0, **params
    ) -> Request:
        params.setdefault("temperature", 0.0)
        request = Request(
            request_id, list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}), priority=priority
        )
        if script is not None:
            self.scripts[request_id] = script
        self.scheduler.add_request(request)
        self.requests[request_id] = request
        return request

    def next_token(self, request: Request, length: int) -> int:
        script = self.scripts.get(request.request_id)
        index = length - request.num_prompt_tokens
        if script is not None and index < len(script):
            return script[index]
        return natural_token(request.request_id, length)

    def release(self, request_ids: list[str]) -> None:
        """What the engine does between steps for ended and preempted requests."""
        for request_id in request_ids:
            self.tables.pop(request_id, None)

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted = self.scheduler.abort_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        self.release([r.request_id for r in aborted])
        return aborted

    def step(self) -> tuple[StepPlan, list[Request]]:
        scheduler, cfg = self.scheduler, self.config
        plan = scheduler.schedule()
        self.plans.append(plan)
        self.release(plan.preempted_request_ids)
        if self.room is not None and plan.num_tokens > self.room:  # what the engine does on BackendOutOfMemoryError
            preempted = scheduler.shrink_after_oom(plan)
            assert preempted == [s.request_id for s in plan.scheduled]
            self.release(preempted)
            return plan, []
        if self.check_budget:
            assert plan.num_tokens <= cfg.max_num_batched_tokens
        assert len(plan.scheduled) <= cfg.max_num_seqs
        assert len(scheduler.running) <= cfg.max_num_seqs
        assert len({s.request_id for s in plan.scheduled}) == len(plan.scheduled)
        sampled = {}
        for item in plan.scheduled:
            request = self.requests[item.request_id]
            assert request.status == RequestStatus.RUNNING
            tokens = request.all_token_ids
            start, end = item.start_position, item.start_position + len(item.token_ids)
            assert item.token_ids, "a scheduled request computes at least one token"
            assert item.token_ids == tokens[start:end]
            # new exactly when the backend holds nothing for it: first admission, or back after preemption
            assert item.is_new == (item.request_id not in self.tables)
            table = self.tables[item.request_id] = [*self.tables.get(item.request_id, ()), *item.new_block_ids]
            assert table == request.block_ids  # the incremental table adds up to the scheduler's
            assert len(table) == -(-end // cfg.block_size)
            assert item.samples == (end == request.num_tokens)
            for pos in range(start):  # the KV it attends to must be its own prefix
                slot = (table[pos // cfg.block_size], pos % cfg.block_size)
                assert self.kv.get(slot) == tuple(tokens[: pos + 1]), f"{item.request_id}: bad KV at {pos}"
            for pos in range(start, end):
                self.kv[(table[pos // cfg.block_size], pos % cfg.block_size)] = tuple(tokens[: pos + 1])
            if item.samples:
                sampled[item.request_id] = SampledToken(self.next_token(request, end))
        assert plan.sampling_request_ids == list(sampled)
        finished = scheduler.update(plan, StepResult(sampled))
        self.release([r.request_id for r in finished])
        scheduler.block_manager.check_invariants(scheduler.running)
        assert set(self.tables) == {r.request_id for r in scheduler.running}  # no table outlives its request
        return plan, finished

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("the scheduler made no progress")

    def outputs(self) -> dict[str, list[int]]:
        return {rid: list(r.output_token_ids) for rid, r in self.requests.items()}

    def assert_all_blocks_free(self) -> None:
        bm = self.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        bm.check_invariants([])


def scheduled_tokens(plan: StepPlan) -> dict[str, int]:
    return {s.request_id: len(s.token_ids) for s in plan.scheduled}


# ----- joining, budgets, chunked prefill -----


def test_a_request_joining_a_running_batch_is_scheduled_while_the_others_keep_decoding() -> None:
    sim = Sim(config(max_num_batched_tokens=16))
    sim.add("a", list(range(5)), max_tokens=30)
    sim.add("b", list(range(10, 17)), max_tokens=30)
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"a": 5, "b": 7}
    for _ in range(3):
        plan, _ = sim.step()
        assert scheduled_tokens(plan) == {"a": 1, "b": 1}

    sim.add("c", list(range(100, 140)), max_tokens=3)  # 40 tokens: three chunks of at most 14
    chunks = []
    while sim.requests["c"].num_output_tokens == 0:
        plan, _ = sim.step()
        tokens = scheduled_tokens(plan)
        assert tokens["a"] == 1 and tokens["b"] == 1  # decodes never stall for the prefill
        chunks.append(tokens["c"])
    assert chunks == [14, 14, 12]
    sim.run()
    assert sim.outputs()["c"] == [natural_token("c", n) for n in range(40, 43)]
    sim.assert_all_blocks_free()


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_last_chunk() -> None:
    sim = Sim(config(max_num_batched_tokens=16))
    prompt = list(range(200, 240))
    sim.add("long", prompt, max_tokens=2)
    items = []
    for _ in range(3):
        plan, _ = sim.step()
        (item,) = plan.scheduled
        items.append(item)
    assert [(i.start_position, len(i.token_ids), i.samples) for i in items] == [
        (0, 16, False),
        (16, 16, False),
        (32, 8, True),
    ]
    assert [t for i in items for t in i.token_ids] == prompt
    assert sim.requests["long"].output_token_ids == [natural_token("long", 40)]
    sim.run()
    assert sim.requests["long"].finish_reason == "length"


def test_without_chunked_prefill_a_prompt_is_scheduled_whole() -> None:
    sim = Sim(config(max_num_batched_tokens=32, enable_chunked_prefill=False))
    sim.add("first", list(range(20)), max_tokens=4)
    sim.add("second", list(range(100, 120)), max_tokens=4)
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"first": 20}  # 12 tokens of budget left: "second" waits
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"first": 1, "second": 20}
    assert plan.scheduled[1].samples
    sim.run()
    sim.assert_all_blocks_free()


def test_without_chunked_prefill_a_prompt_over_the_step_budget_runs_alone() -> None:
    sim = Sim(config(max_num_batched_tokens=16, enable_chunked_prefill=False), check_budget=False)
    sim.add("small", [1, 3, 4], max_tokens=3)
    sim.add("huge", list(range(100, 140)), max_tokens=2)
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"small": 3}
    while not sim.requests["huge"].output_token_ids:
        plan, _ = sim.step()
        if "huge" in scheduled_tokens(plan):
            assert scheduled_tokens(plan) == {"huge": 40}
    sim.run()
    assert sim.requests["small"].finish_reason == sim.requests["huge"].finish_reason == "length"


def test_max_num_seqs_limits_running_requests() -> None:
    sim = Sim(config(max_num_seqs=2))
    for i in range(5):
        sim.add(f"r{i}", [10 + i, 20, 30], max_tokens=3 + i)
    seen_running = set()
    while sim.scheduler.has_unfinished_requests():
        plan, _ = sim.step()
        assert len(plan.scheduled) <= 2
        seen_running.update(scheduled_tokens(plan))
    assert seen_running == {f"r{i}" for i in range(5)}
    assert all(len(sim.requests[f"r{i}"].output_token_ids) == 3 + i for i in range(5))


def test_no_step_exceeds_the_token_budget_with_many_prompts() -> None:
    sim = Sim(config(max_num_batched_tokens=10, max_num_seqs=6))
    for i in range(6):
        sim.add(f"r{i}", list(range(i * 50, i * 50 + 7 + 3 * i)), max_tokens=5)
    sim.run()  # Sim.step asserts the budgets on every plan
    assert max(p.num_tokens for p in sim.plans) == 10
    assert all(r.finish_reason == "length" for r in sim.requests.values())
    sim.assert_all_blocks_free()


# ----- stop conditions -----


def test_max_tokens_stops_with_length() -> None:
    sim = Sim(config())
    request = sim.add("a", [5, 6, 7], max_tokens=4)
    sim.run()
    assert request.output_token_ids == [natural_token("a", n) for n in range(3, 7)]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.finish_reason == "length"


def test_max_model_len_stops_a_request_without_max_tokens() -> None:
    sim = Sim(config(max_model_len=12))
    request = sim.add("a", list(range(9)), max_tokens=None)
    sim.run()
    assert request.num_tokens == 12
    assert request.finish_reason == "length"


def test_eos_stops_and_is_kept_in_the_output() -> None:
    sim = Sim(config())
    request = sim.add("a", [5, 6, 7], script=[40, 41, EOS, 43], max_tokens=10)
    sim.run()
    assert request.output_token_ids == [40, 41, EOS]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason is None


def test_ignore_eos_runs_to_max_tokens() -> None:
    sim = Sim(config())
    request = sim.add("a", [5, 6, 7], script=[EOS, 41, EOS], max_tokens=5, ignore_eos=True)
    sim.run()
    assert request.output_token_ids[:3] == [EOS, 41, EOS]
    assert len(request.output_token_ids) == 5
    assert request.finish_reason == "length"


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    sim = Sim(config())
    eos_request = sim.add("eos", [5, 6], script=[EOS] * 10, max_tokens=10, min_tokens=3)
    stop_request = sim.add("stop", [5, 7], script=[9] * 10, max_tokens=10, min_tokens=4, stop_token_ids=[9])
    sim.run()
    assert eos_request.output_token_ids == [EOS] * 3
    assert eos_request.finish_reason == "stop"
    assert stop_request.output_token_ids == [9] * 4
    assert stop_request.stop_reason == 9


def test_stop_token_ids_stop_with_the_token_as_reason() -> None:
    sim = Sim(config())
    request = sim.add("a", [5, 6, 7], script=[40, 77, 41], max_tokens=10, stop_token_ids=[77, 78])
    sim.run()
    assert request.output_token_ids == [40, 77]
    assert request.finish_reason == "stop"
    assert request.stop_reason == 77


def test_a_decode_step_sends_only_the_block_ids_it_adds() -> None:
    """The plan costs O(new tokens): after the first step a request's table arrives one new block at a time."""
    sim = Sim(config(block_size=4, max_num_batched_tokens=64))
    request = sim.add("long", list(range(100, 130)), max_tokens=20)  # 30 prompt tokens: 8 blocks
    plan, _ = sim.step()
    (item,) = plan.scheduled
    assert item.is_new and item.new_block_ids == request.block_ids and len(item.new_block_ids) == 8
    sent = list(item.new_block_ids)
    for _ in range(11):
        plan, _ = sim.step()
        (item,) = plan.scheduled
        assert not item.is_new and len(item.token_ids) == 1
        if item.start_position % 4:  # the token lands in a block the request already has
            assert item.new_block_ids == []
        else:  # it opens a block: that one id, and nothing already sent
            assert item.new_block_ids == [request.block_ids[-1]] and request.block_ids[-1] not in sent
        sent += item.new_block_ids
    assert sent == request.block_ids == sim.tables["long"]
    assert request.num_tokens == 42 and len(sent) == 11  # blocks opened at positions 32, 36 and 40


def test_a_chunked_prompt_gets_its_table_in_pieces() -> None:
    sim = Sim(config(block_size=4, max_num_batched_tokens=10))
    request = sim.add("long", list(range(100, 125)), max_tokens=1)  # 25 tokens in chunks of 10, 10, 5
    pieces = []
    while not request.is_finished:
        plan, _ = sim.step()
        (item,) = plan.scheduled
        pieces.append((item.is_new, item.new_block_ids))
    assert [(new, len(ids)) for new, ids in pieces] == [(True, 3), (False, 2), (False, 2)]
    assert "long" not in sim.tables  # released when it finished


# ----- preemption -----


def _preemption_workload(sim: Sim) -> None:
    for name in ("a", "b", "c"):
        sim.add(name, [ord(name), 1, 3, 4, 5, 6], max_tokens=10)  # 16 tokens = 4 blocks each


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_evicts_the_newest_request_and_it_completes_with_the_same_outputs(
    prefix_caching: bool,
) -> None:
    reference = Sim(config(num_blocks=64, enable_prefix_caching=prefix_caching))
    _preemption_workload(reference)
    reference.run()
    assert reference.scheduler.num_preemptions == 0

    sim = Sim(config(num_blocks=6, enable_prefix_caching=prefix_caching))  # room for 24 of the 48 tokens
    _preemption_workload(sim)
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"a": 6, "b": 6, "c": 6}
    while not plan.preempted_request_ids:
        plan, _ = sim.step()
    assert plan.preempted_request_ids == ["c"]  # the last admitted
    victim = sim.requests["c"]
    assert victim.status == RequestStatus.WAITING
    assert victim.block_ids == []
    assert victim.num_computed_tokens == 0
    assert victim.num_preemptions == 1
    assert victim in sim.scheduler.waiting and victim not in sim.scheduler.running
    assert "c" not in scheduled_tokens(plan)
    assert "c" not in sim.tables  # the engine released it

    while "c" not in scheduled_tokens(plan):
        plan, _ = sim.step()
    (item,) = [s for s in plan.scheduled if s.request_id == "c"]
    assert item.is_new and item.new_block_ids == victim.block_ids  # back with its whole (new) table

    sim.run()
    assert sim.scheduler.num_preemptions >= 1
    assert sim.outputs() == reference.outputs()
    assert all(r.finish_reason == "length" for r in sim.requests.values())
    sim.assert_all_blocks_free()


def test_a_preempted_request_goes_back_to_the_head_of_the_queue() -> None:
    sim = Sim(config(num_blocks=7, max_num_seqs=3, enable_prefix_caching=False))
    _preemption_workload(sim)
    sim.step()
    sim.add("d", [9, 9], max_tokens=2)  # waits: max_num_seqs
    while True:
        running_before = {r.request_id for r in sim.scheduler.running}
        plan, _ = sim.step()
        if plan.preempted_request_ids:
            break
    assert plan.preempted_request_ids == ["c"]
    # blocks were short: nothing is admitted in that step, though "d" would now fit
    assert set(scheduled_tokens(plan)) <= running_before - {"c"}
    assert [r.request_id for r in sim.scheduler.waiting] == ["c", "d"]
    preempted_at = len(sim.plans) - 1
    sim.run()
    resumed = next(i for i, p in enumerate(sim.plans) if i > preempted_at and "c" in scheduled_tokens(p))
    started = next(i for i, p in enumerate(sim.plans) if "d" in scheduled_tokens(p))
    assert resumed <= started
    sim.assert_all_blocks_free()


def test_a_preempted_request_recomputes_its_generated_tokens() -> None:
    sim = Sim(config(num_blocks=6, enable_prefix_caching=False))
    _preemption_workload(sim)
    while sim.requests["c"].num_preemptions == 0:
        sim.step()
    generated = len(sim.requests["c"].output_token_ids)
    assert generated > 0
    while True:
        plan, _ = sim.step()
        if "c" in scheduled_tokens(plan):
            break
    (item,) = [s for s in plan.scheduled if s.request_id == "c"]
    assert item.start_position == 0
    assert len(item.token_ids) == 6 + generated  # prompt and outputs, then it samples the next token
    assert item.samples
    assert item.is_new and len(item.new_block_ids) == -(-(6 + generated) // 4)  # the full table, afresh


# ----- aborts -----


def test_abort_of_a_waiting_request() -> None:
    sim = Sim(config(max_num_seqs=1))
    sim.add("running", [1, 3, 4], max_tokens=5)
    waiting = sim.add("waiting", [1, 3, 5], max_tokens=5)
    sim.step()
    assert waiting.status == RequestStatus.WAITING
    aborted = sim.abort(["waiting"])
    assert aborted == [waiting]
    assert waiting.finish_reason == "abort"
    assert waiting not in sim.scheduler.waiting
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"running": 1}
    sim.run()
    assert waiting.output_token_ids == []
    sim.assert_all_blocks_free()


def test_abort_of_a_running_request_frees_its_blocks() -> None:
    sim = Sim(config(num_blocks=16))
    running = sim.add("running", list(range(10)), max_tokens=20)
    sim.add("other", list(range(20, 25)), max_tokens=20)
    sim.step()
    sim.step()
    bm = sim.scheduler.block_manager
    held = len(running.block_ids)
    assert held == 3
    free_before = bm.num_free_blocks
    assert sim.abort(["running", "nope"]) == [running]
    assert running.status == RequestStatus.FINISHED_ABORTED
    assert running.block_ids == []
    assert bm.num_free_blocks == free_before + held
    bm.check_invariants(sim.scheduler.running)
    plan, _ = sim.step()
    assert scheduled_tokens(plan) == {"other": 1}
    # aborting again (or a finished request) is a no-op
    assert sim.abort(["running"]) == []
    sim.abort(["other"])
    assert not sim.scheduler.has_unfinished_requests()
    sim.assert_all_blocks_free()


def test_abort_while_a_step_runs_drops_its_result() -> None:
    sim = Sim(config())
    request = sim.add("a", [5, 6, 7], max_tokens=5)
    sim.add("b", [5, 6, 8], max_tokens=5)
    sim.step()
    plan = sim.scheduler.schedule()
    sim.scheduler.abort_requests(["a"], RequestStatus.FINISHED_ABORTED)
    result = StepResult({s.request_id: SampledToken(7) for s in plan.scheduled})
    finished = sim.scheduler.update(plan, result)
    assert finished == []
    assert len(request.output_token_ids) == 1
    assert sim.requests["b"].output_token_ids[-1] == 7


# ----- admission -----


def test_a_request_larger_than_the_pool_is_rejected_at_add() -> None:
    scheduler = FCFSScheduler(config(num_blocks=4, block_size=4))
    too_big = Request("big", list(range(10)), SamplingParams(max_tokens=7))  # 17 tokens: 5 blocks
    with pytest.raises(ValueError, match="big"):
        scheduler.add_request(too_big)
    unbounded = Request("unbounded", list(range(10)), SamplingParams(max_tokens=None))  # may grow to 256
    with pytest.raises(ValueError, match="unbounded"):
        scheduler.add_request(unbounded)
    assert not scheduler.has_unfinished_requests()

    sim = Sim(config(num_blocks=4, block_size=4))
    fits = sim.add("fits", list(range(10)), max_tokens=6)  # exactly 16 tokens
    sim.run()
    assert len(fits.output_token_ids) == 6
    sim.assert_all_blocks_free()


def test_a_shared_prompt_prefix_is_computed_once() -> None:
    sim = Sim(config(block_size=4))
    prefix = list(range(100, 116))
    first = sim.add("first", prefix + [1], max_tokens=2)
    sim.step()
    second = sim.add("second", prefix + [3, 4], max_tokens=2)
    first_table = list(sim.tables["first"])
    plan, _ = sim.step()
    first_item, item = plan.scheduled
    assert (first_item.request_id, item.request_id) == ("first", "second")
    assert item.start_position == 16
    assert item.token_ids == [3, 4]
    assert second.num_cached_tokens == 16
    assert item.is_new and item.new_block_ids[:4] == first_table[:4]  # whole table, the shared blocks first
    assert not first_item.is_new and first_item.new_block_ids == []  # position 17 is in its fifth block
    assert first.is_finished
    sim.run()
    stats = sim.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (17 + 18, 16)
    sim.assert_all_blocks_free()


def test_scheduler_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import ernie_serve.core.scheduler, ernie_serve.core.block_manager, "
        "ernie_serve.core.request, ernie_serve.core.sampling_params, ernie_serve.core.plan; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----- property: random workloads -----

request_specs = st.lists(
    st.tuples(
        st.integers(0, 4),  # arrival step
        st.integers(0, 12),  # shared-prefix length
        st.integers(1, 10),  # own tail length
        st.integers(1, 12),  # max_tokens
        st.one_of(st.none(), st.integers(0, 14)),  # abort step
        st.booleans(),  # may stop at EOS
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(
    specs=request_specs,
    block_size=st.sampled_from([1, 2, 4]),
    spare_blocks=st.integers(0, 3),
    max_num_seqs=st.integers(1, 4),
    max_num_batched_tokens=st.integers(1, 24),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
)
def test_random_workloads_keep_the_invariants(
    specs, block_size, spare_blocks, max_num_seqs, max_num_batched_tokens, chunked, prefix_caching
) -> None:
    shared = list(range(500, 512))
    largest = max(p + t + m for _, p, t, m, _, _ in specs)
    num_blocks = -(-largest // block_size) + spare_blocks
    if not chunked:  # without chunking a prompt must fit one step's budget (else it runs alone, over budget)
        max_num_batched_tokens = max(max_num_batched_tokens, largest)
    sim = Sim(
        config(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_blocks=num_blocks,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix_caching,
        )
    )
    aborted: set[str] = set()
    last_arrival = max(s[0] for s in specs)
    for step in range(400):
        for i, (arrival, prefix, tail, max_tokens, _, eos) in enumerate(specs):
            if arrival == step:
                script = [natural_token(f"r{i}", 0), EOS] if eos else None
                sim.add(
                    f"r{i}", shared[:prefix] + [600 + 10 * i + k for k in range(tail)], script, max_tokens=max_tokens
                )
        to_abort = [f"r{i}" for i, s in enumerate(specs) if s[4] == step and f"r{i}" in sim.requests]
        for request in sim.abort(to_abort):
            aborted.add(request.request_id)
        sim.scheduler.block_manager.check_invariants(sim.scheduler.running)
        if step > last_arrival and not sim.scheduler.has_unfinished_requests():
            break
        sim.step()
    else:
        raise AssertionError("requests never finished")

    assert len(sim.requests) == len(specs)
    for request_id, request in sim.requests.items():
        assert request.is_finished
        assert (request.status == RequestStatus.FINISHED_ABORTED) == (request_id in aborted)
        if request_id in aborted:
            continue
        max_tokens = request.sampling_params.max_tokens
        script = sim.scripts.get(request_id, [])
        expected = [sim.next_token(request, request.num_prompt_tokens + k) for k in range(max_tokens)]
        if EOS in script and script.index(EOS) < max_tokens:
            expected = expected[: script.index(EOS) + 1]
        assert request.output_token_ids == expected
    assert not sim.scheduler.requests
    sim.assert_all_blocks_free()
    event(f"preempted: {sim.scheduler.num_preemptions > 0}")
    event(f"aborted: {bool(aborted)}")
    event(f"prefix hits: {sim.scheduler.stats().prefix_cache_hits > 0}")


# ----- the priority scheduler -----


def test_priority_orders_the_waiting_queue_lower_first_ties_by_arrival() -> None:
    sim = Sim(config(max_num_seqs=1), scheduler_cls=PriorityScheduler)
    for request_id, priority in (("late-low", 5), ("urgent", -1), ("normal-1", 0), ("normal-2", 0)):
        sim.add(request_id, [1, 2, 3], max_tokens=2, priority=priority)
    order = []
    while sim.scheduler.has_unfinished_requests():
        plan, _ = sim.step()
        for item in plan.scheduled:
            if item.request_id not in order:
                order.append(item.request_id)
    assert order == ["urgent", "normal-1", "normal-2", "late-low"]


def test_priority_preemption_evicts_the_lowest_priority_and_outputs_are_unchanged() -> None:
    prompts = {"low": list(range(10, 22)), "high": list(range(30, 42)), "mid": list(range(50, 62))}
    priorities = {"low": 9, "high": 0, "mid": 5}
    roomy = Sim(config(num_blocks=64), scheduler_cls=PriorityScheduler)
    for request_id, prompt in prompts.items():
        roomy.add(request_id, prompt, max_tokens=12, priority=priorities[request_id])
    roomy.run()

    tight = Sim(config(num_blocks=14), scheduler_cls=PriorityScheduler)
    for request_id, prompt in prompts.items():
        tight.add(request_id, prompt, max_tokens=12, priority=priorities[request_id])
    tight.run()
    assert tight.requests["low"].num_preemptions > 0
    assert tight.requests["high"].num_preemptions == 0
    assert tight.outputs() == roomy.outputs()
    tight.assert_all_blocks_free()


def test_a_waiting_high_priority_request_evicts_a_running_lower_one() -> None:
    sim = Sim(config(num_blocks=8), scheduler_cls=PriorityScheduler)
    sim.add("background", list(range(10, 26)), max_tokens=10, priority=10)
    sim.step()
    assert sim.requests["background"].status == RequestStatus.RUNNING
    sim.add("urgent", list(range(30, 46)), max_tokens=10, priority=0)
    plan, _ = sim.step()
    assert [s.request_id for s in plan.scheduled] == ["urgent"]
    assert sim.requests["background"].status == RequestStatus.WAITING
    assert plan.preempted_request_ids == ["background"]
    sim.run()
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in sim.requests.values())
    sim.assert_all_blocks_free()


def test_fcfs_never_evicts_for_a_newcomer() -> None:
    sim = Sim(config(num_blocks=8))
    sim.add("first", list(range(10, 26)), max_tokens=10, priority=10)
    sim.step()
    sim.add("second", list(range(30, 46)), max_tokens=10, priority=0)
    plan, _ = sim.step()
    assert [s.request_id for s in plan.scheduled] == ["first"]


# ----- out of memory -----


def test_a_step_that_runs_out_of_memory_is_preempted_and_later_steps_are_smaller_until_idle() -> None:
    def add_all(sim: Sim) -> None:
        for i in range(4):
            sim.add(f"r{i}", list(range(10 * i, 10 * i + 10)), max_tokens=5)

    reference = Sim(config())
    add_all(reference)
    reference.run()
    sim = Sim(config(), room=12)
    add_all(sim)
    sim.run()
    assert sim.outputs() == reference.outputs()  # recomputed, nothing lost
    first, second = sim.plans[0], sim.plans[1]
    assert first.num_tokens == 40 and second.num_tokens <= 20  # the failed step's budget, halved
    assert sim.scheduler.num_oom_retries == 2  # 40 tokens, then 20, then at most 10 fit the room
    assert all(plan.num_tokens <= 10 for plan in sim.plans[2:])
    assert sim.scheduler.stats().num_oom_retries == 2
    sim.assert_all_blocks_free()

    # once idle, the full budget is back
    sim.add("late", list(range(500, 530)), max_tokens=1)
    plan = sim.scheduler.schedule()
    assert plan.num_tokens == 30


def test_one_token_of_one_request_cannot_shrink() -> None:
    sim = Sim(config())
    sim.add("a", [5], max_tokens=2)
    plan = sim.scheduler.schedule()
    assert plan.num_tokens == 1
    assert sim.scheduler.shrink_after_oom(plan) == []
    assert sim.scheduler.requests["a"].status == RequestStatus.RUNNING  # left as it was: the engine fails it
