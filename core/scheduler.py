"""The scheduler interface and the built-in first-come-first-served scheduler.

Pure Python: importing this module must not import torch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from ernie_serve.core.block_manager import KVBlockManager
from ernie_serve.core.plan import ScheduledRequest, StepPlan, StepResult
from ernie_serve.core.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    """Counters the engine exports as metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_oom_retries: int = 0  # steps that ran out of memory and were retried smaller


class Scheduler(ABC):
    """Decides which requests compute which tokens each step.

    The engine calls `add_request` when a request arrives, `schedule` at the start of every step, hands the
    plan to the backend, then calls `update` with what was sampled; `abort_requests` between steps.
    """

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Called when a request arrives (already validated: it fits the context limit)."""

    @abstractmethod
    def abort_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Called between steps (client gone, stop string hit): finish these requests with `status`, free
        their blocks, and return the ones that were still unfinished."""

    @abstractmethod
    def schedule(self) -> StepPlan:
        """Called at the start of every step: pick requests and token counts within the budgets. A request's
        first step after (re)admission is `is_new` and carries its whole block table; later steps carry only the
        block ids allocated since, so the backend keeps each table until the engine calls `release`."""

    @abstractmethod
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Called after the backend ran `plan` and tokens were sampled: append tokens, advance
        `num_computed_tokens`, apply token-level stop conditions; return requests that finished this step."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Called by the engine loop to decide whether to keep stepping."""

    def stats(self) -> SchedulerStats:
        """Called after every step for metrics; schedulers without counters may keep this default."""
        return SchedulerStats()

    def reset_prefix_cache(self) -> bool:
        """Called on an idle engine (`Engine.reset_prefix_cache`): forget every cached prefix; False where a request
        still holds blocks. Schedulers without a prefix cache may keep this default."""
        return True

    def shrink_after_oom(self, plan: StepPlan) -> list[str]:
        """Called when the backend ran out of memory running `plan`: preempt requests and plan smaller steps,
        returning the ids preempted (the engine releases their backend state). [] fails the plan's requests."""
        return []


@dataclass(frozen=True)
class SchedulerConfig:
    """The budgets a scheduler works within; the engine builds it from EngineSettings and the KV pool."""

    max_num_seqs: int  # requests running at once
    max_num_batched_tokens: int  # tokens computed in one step
    max_model_len: int  # prompt + output limit per request
    block_size: int  # tokens per KV block
    num_blocks: int  # KV pool size
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True


class FCFSScheduler(Scheduler):
    """First come, first served, with token budgets, chunked prefill, prefix caching and preemption.

    There is no prefill or decode mode: each running request gets `num_tokens - num_computed_tokens` new tokens
    (capped by the step budget), so chunked prefill, prefix-cache hits and decode are one case. Running requests
    are served before waiting ones; when blocks run out the last-admitted running request is preempted (its
    blocks freed, recomputed later). Subclasses change the order by overriding `waiting_order_key` and
    `preemption_victim`.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = KVBlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_oom_retries = 0
        self.oom_token_cap: int | None = None  # step budget after running out of memory; lifted once idle

    # ----- policy hooks for subclasses -----
    def waiting_order_key(self, request: Request) -> tuple:
        """Sort key of the waiting queue: first element runs first."""
        return (request.arrival_time,)

    def preemption_victim(self) -> Request:
        """The running request to evict when a running one needs blocks: the one admitted last."""
        return self.running[-1]

    def admission_victim(self, request: Request) -> Request | None:
        """A running request to evict so that waiting `request` fits, or None to let it wait (FCFS never
        evicts for a newcomer)."""
        return None

    # ----- interface -----
    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def add_request(self, request: Request) -> None:
        max_tokens = request.sampling_params.max_tokens
        max_len = self.config.max_model_len  # max_tokens=None: it may grow to the context limit
        if max_tokens is not None:
            max_len = min(max_len, request.num_prompt_tokens + max_tokens)
        blocks_needed = self.block_manager.blocks_needed(max_len)
        if blocks_needed > self.config.num_blocks:
            raise ValueError(
                f"request {request.request_id} needs {blocks_needed} KV blocks but the pool has "
                f"{self.config.num_blocks}: it can never be scheduled"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.waiting.sort(key=self.waiting_order_key)

    def abort_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
            self._finish(request, status)
            aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        config = self.config
        budget = min(config.max_num_batched_tokens, self.oom_token_cap or config.max_num_batched_tokens)
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # Running requests first, in admission order, so decodes keep flowing while long prompts prefill.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(request, num_new):
                victim = self.preemption_victim()
                if self.running.index(victim) < index:
                    index -= 1
                budget += self._preempt(victim, scheduled, preempted)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # it preempted itself; `index` now points at the next one
            held = len(request.block_ids)  # the backend has these since earlier steps
            self.block_manager.allocate(request, num_new)
            scheduled.append(self._scheduled(request, num_new, request.block_ids[held:], is_new=False))
            budget -= num_new
            index += 1

        # Then admit waiting requests while budgets and blocks allow (not in a step that had to preempt).
        blocks_ran_short = bool(preempted)
        while self.waiting and budget > 0 and len(self.running) < config.max_num_seqs and not blocks_ran_short:
            request = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(request)
            request.num_computed_tokens = len(cached) * config.block_size
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new > budget and not config.enable_chunked_prefill:
                if scheduled:
                    break
                # an unchunked prompt larger than the step budget would wait forever: run it alone
            else:
                num_new = min(num_new, budget)
            if not self.block_manager.can_allocate(request, num_new, cached):
                victim = self.admission_victim(request)
                if victim is None:
                    request.num_computed_tokens = 0
                    break
                budget += self._preempt(victim, scheduled, preempted)
                continue  # look again: the freed blocks may have changed the prefix hit too
            self.waiting.pop(0)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = request.num_computed_tokens
            self.block_manager.record_prefix_lookup(request, request.num_computed_tokens)
            self.block_manager.allocate(request, num_new, cached)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            # admitted, or readmitted after preemption: the backend gets the whole table, prefix hits included
            scheduled.append(self._scheduled(request, num_new, list(request.block_ids), is_new=True))
            budget -= num_new
        return StepPlan(scheduled=scheduled, preempted_request_ids=preempted)

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        finished: list[Request] = []
        for item in plan.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.is_finished:  # aborted while the step ran: `_finish` dropped it
                continue
            request.num_computed_tokens += len(item.token_ids)
            self.block_manager.cache_computed_blocks(request)
            sampled = result.sampled.get(item.request_id)
            if sampled is None:
                continue
            request.output_token_ids.append(sampled.token_id)
            status = self._stop_status(request, sampled.token_id)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
                finished.append(request)
        if not self.running and not self.waiting:
            self.oom_token_cap = None  # idle: the next requests get the full step budget again
        return finished

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            num_preemptions=self.num_preemptions,
            num_oom_retries=self.num_oom_retries,
        )

    def shrink_after_oom(self, plan: StepPlan) -> list[str]:
        """Preempt every request of the failed step (the backend may hold part of its state, so none of it is
        kept) and halve the step's token budget until the scheduler is next idle. One token of one request
        cannot get smaller: that step fails instead."""
        tokens = sum(len(item.token_ids) for item in plan.scheduled)
        if tokens <= 1:
            return []
        self.oom_token_cap = tokens // 2
        self.num_oom_retries += 1
        preempted: list[str] = []
        for item in plan.scheduled:
            request = self.requests.get(item.request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self._preempt(request, [], preempted)
        return preempted

    # ----- internals -----
    def _scheduled(self, request: Request, num_new: int, new_block_ids: list[int], is_new: bool) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, start + num_new),
            start_position=start,
            new_block_ids=new_block_ids,
            is_new=is_new,
            samples=start + num_new == request.num_tokens,
        )

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        may_stop = request.num_output_tokens >= params.min_tokens
        if may_stop and token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        eos = may_stop and not params.ignore_eos and token_id in request.eos_token_ids
        if eos or any(p.is_finished for p in request.logits_processors):  # or its grammar took its last token
            return RequestStatus.FINISHED_STOPPED
        at_max_tokens = params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        if at_max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _preempt(self, request: Request, scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        """Evict by recompute: drop its blocks and put it back in the waiting queue (its next schedule is
        `is_new`, with a fresh table). If it was already in this step's plan, take it out; returns the tokens
        that gives back to the step budget."""
        item = next((item for item in scheduled if item.request_id == request.request_id), None)
        if item is not None:
            scheduled.remove(item)
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        preempted.append(request.request_id)
        self.waiting.insert(0, request)
        self.waiting.sort(key=self.waiting_order_key)
        return 0 if item is None else len(item.token_ids)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finished_time = time.monotonic()
        self.block_manager.free(request)
        del self.requests[request.request_id]
