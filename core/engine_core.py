"""The engine core: `schedule -> execute -> sample -> update`, one step at a time, in tokens only.

It owns the backend, the scheduler and the sampler, and reports per request what a step produced: new token
ids, their logprobs, and a finish reason. It knows no text: detokenizing, stop strings, `n` groups and the
shape of what callers get happen once, in the frontend's output processor (`ernie_serve.output_processor`).
Not thread-safe: one caller steps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from ernie_serve.core.backend import Backend, BackendUnavailableError
from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.core.errors import BackendOutOfMemoryError, UserError
from ernie_serve.core.plan import SampledToken, StepResult
from ernie_serve.core.plugins import get_backend_class, get_scheduler_class
from ernie_serve.core.request import Logprob, Request, RequestStatus
from ernie_serve.core.sampler import Sampler, SamplingState
from ernie_serve.core.scheduler import Scheduler, SchedulerConfig

log = structlog.get_logger("ernie_serve.engine")

# Without an explicit size, the CPU KV pool takes at most this much memory.
DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


class EngineConfigError(UserError, ValueError):
    """Settings the engine cannot run with (a context limit the KV pool cannot hold, a pool under one block)."""


class UnsupportedQuantizationError(UserError, ValueError):
    """`--quantization` names a scheme the selected backend does not declare in its capabilities."""


@dataclass
class EngineCoreOutput:
    """What one step (or a finish between steps) did to one request."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (none for a finish between steps)
    new_logprobs: list[dict[int, Logprob]] | None  # one entry per new token when logprobs were asked for
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while it runs
    stop_reason: int | str | None = None  # the stop token id that ended it
    metrics: dict[str, float] | None = None  # on the finishing output: see `request_metrics`
    token_time: float | None = None  # when its new tokens were sampled (monotonic seconds)


class EngineCore:
    """Loads the backend, sizes the KV pool, and steps requests through scheduler, backend and sampler."""

    def __init__(self, settings: EngineSettings, model_config: ModelConfig, weights_path: str | None) -> None:
        self.settings = settings
        self.model_config = model_config
        backend_cls = get_backend_class(settings.backend)
        unavailable = backend_cls.availability()
        if unavailable:
            raise BackendUnavailableError(f"backend {settings.backend!r} cannot run here: {unavailable}")
        capabilities = backend_cls.capabilities
        if settings.quantization and settings.quantization not in capabilities.quantization:
            # refused, not ignored: serving full precision would need several times the memory asked for
            supported = ", ".join(capabilities.quantization) or "none"
            raise UnsupportedQuantizationError(
                f"--quantization {settings.quantization}: the {settings.backend} backend does not implement it "
                f"(its schemes: {supported})"
            )
        # FastDeploy's command lines must run unchanged (DESIGN.md): other flags it does not implement are
        # reported, not refused.
        if settings.tensor_parallel_size > 1 and not capabilities.tensor_parallel:
            log.warning(
                f"--tensor-parallel-size {settings.tensor_parallel_size} has no effect here: the "
                f"{settings.backend} backend runs on one device"
            )
        options = backend_cls.options_class(**settings.backend_options)
        self.backend: Backend = backend_cls()
        self.backend.load(model_config, settings, weights_path, options)
        self.weight_bytes = self.backend.weight_bytes  # fixed once loaded; the gateway exports it as a gauge

        self.num_blocks, self.max_model_len = self._size_kv_pool()
        self.backend.allocate_kv_cache(self.num_blocks, settings.block_size)
        if settings.enable_prefix_caching and not capabilities.prefix_caching:
            log.info("prefix caching turned off: this backend keeps one KV cache per request", backend=settings.backend)
        self.scheduler: Scheduler = get_scheduler_class(settings.scheduler)(
            SchedulerConfig(
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=settings.block_size,
                num_blocks=self.num_blocks,
                enable_chunked_prefill=settings.enable_chunked_prefill,
                enable_prefix_caching=settings.enable_prefix_caching and capabilities.prefix_caching,
            )
        )
        self.sampler = Sampler(settings.seed)
        self._requests: dict[str, tuple[Request, SamplingState]] = {}  # unfinished requests
        self._step_request_ids: list[str] | None = []  # of the step in progress; None before its plan exists

    def _size_kv_pool(self) -> tuple[int, int]:
        """Blocks from an explicit count or byte size, else free GPU memory, else a CPU default, the last two at
        most what `max_num_seqs` sequences of the longest context fill; then cap the context limit to what the
        pool can hold for one request."""
        s, spec = self.settings, self.backend.kv_cache_spec()
        bytes_per_block = spec.bytes_per_token * s.block_size
        positions = self.model_config.max_position_embeddings
        model_len = min(s.max_model_len or positions, positions)
        # every sequence at the longest context: more blocks could never be used (a tiny model on a 141 GB GPU
        # would otherwise get hundreds of millions, and the block manager a list of them)
        wanted = s.max_num_seqs * -(-model_len // s.block_size)
        if s.num_gpu_blocks_override:
            num_blocks = s.num_gpu_blocks_override
        elif s.kv_cache_memory_bytes:
            num_blocks = s.kv_cache_memory_bytes // bytes_per_block
        else:  # free device memory, or a fixed budget on the CPU
            free = spec.device_free_bytes
            budget = DEFAULT_CPU_KV_CACHE_BYTES if free is None else int(free * s.gpu_memory_utilization)
            num_blocks = min(wanted, budget // bytes_per_block)
        if not s.enable_chunked_prefill and s.max_num_batched_tokens < model_len:
            model_len = s.max_num_batched_tokens  # without chunking, a whole prompt must fit one step
            if s.max_model_len and s.max_model_len > model_len:
                raise EngineConfigError(
                    f"--max-model-len {s.max_model_len} exceeds --max-num-batched-tokens {s.max_num_batched_tokens}"
                    " with chunked prefill off: a prompt that long could never be scheduled; raise the step budget"
                    " or enable chunked prefill"
                )
        if num_blocks < 1:
            raise EngineConfigError("the KV cache budget is smaller than one block; raise --kv-cache-memory-bytes")
        if model_len > num_blocks * s.block_size:
            if s.max_model_len:
                raise EngineConfigError(
                    f"--max-model-len {s.max_model_len} needs {-(-s.max_model_len // s.block_size)} KV blocks "
                    f"but the pool holds {num_blocks}; lower it or give the KV cache more memory"
                )
            model_len = num_blocks * s.block_size
        return num_blocks, model_len

    # ----- requests -----
    def add_request(self, request: Request) -> None:
        """Called by the frontend with a validated request (it fits the context limit, its ids the vocab)."""
        state = self.sampler.new_state(request.sampling_params.seed)
        self.scheduler.add_request(request)
        self._requests[request.request_id] = (request, state)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[EngineCoreOutput]:
        """Called between steps to end requests early: the client went away (aborted) or a stop string was hit
        (stopped). Frees their blocks and backend state; returns their final outputs (no new tokens)."""
        return self._finish(self.scheduler.abort_requests(request_ids, status))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----- the step -----
    def step(self) -> list[EngineCoreOutput]:
        """Run one step: an output for every request that sampled a token or finished. If it raises, the caller
        ends the step's requests with `fail_step` (unless it is an `EngineFatalError`)."""
        self._step_request_ids = None  # until the scheduler has said which requests this step runs
        plan = self.scheduler.schedule()
        self._step_request_ids = [s.request_id for s in plan.scheduled]
        if plan.preempted_request_ids:
            self.backend.release(plan.preempted_request_ids)
        result = StepResult()
        if not plan.is_empty:
            try:
                logits = self.backend.execute(plan)  # [len(plan.sampling_request_ids), V]
            except BackendOutOfMemoryError:
                preempted = self.scheduler.shrink_after_oom(plan)
                if not preempted:
                    raise  # nothing smaller to try: the step's requests fail
                self.backend.release(preempted)
                log.warning(
                    "out of memory in a step: its requests are preempted, smaller steps follow", n=len(preempted)
                )
                return []
            sampling = [self._requests[i] for i in plan.sampling_request_ids]
            sampled = self.sampler(logits, [r for r, _ in sampling], [s for _, s in sampling])
            result.sampled = dict(zip(plan.sampling_request_ids, sampled, strict=True))
        finished = [r.request_id for r in self.scheduler.update(plan, result)]  # in plan order
        ended = set(finished)

        now = time.monotonic()
        outputs = []
        for request_id, token in result.sampled.items():
            request, _ = self._requests[request_id]
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            if request_id not in ended:
                logprobs = None if token.logprobs is None else [token.logprobs]
                outputs.append(EngineCoreOutput(request_id, [token.token_id], logprobs, token_time=now))
        ended = [self._requests[i][0] for i in finished]
        outputs += self._finish(ended, {i: result.sampled[i] for i in finished})
        return outputs

    def _finish(
        self, ended: list[Request], last_tokens: dict[str, SampledToken] | None = None
    ) -> list[EngineCoreOutput]:
        """Final outputs of requests that just ended (with the token that ended them, if one did), and the end
        of their backend state."""
        outputs = []
        for request in ended:
            self._requests.pop(request.request_id, None)
            token = (last_tokens or {}).get(request.request_id)
            outputs.append(
                EngineCoreOutput(
                    request.request_id,
                    [] if token is None else [token.token_id],
                    None if token is None or token.logprobs is None else [token.logprobs],
                    request.finish_reason,
                    request.stop_reason,
                    request_metrics(request),
                    None if token is None else request.last_token_time,
                )
            )
        if ended:  # free per-request backend state now, not when (or if) the next step runs
            self.backend.release([r.request_id for r in ended])
        return outputs

    def fail_step(self) -> list[EngineCoreOutput]:
        """Called after `step` raised: end the requests of that step with finish reason "error", so a request
        whose own parameters caused the fault is never retried; the others keep running. If the scheduler
        itself failed before making a plan, every unfinished request belonged to the step."""
        ids = self._step_request_ids
        return self.finish_requests(list(self._requests) if ids is None else ids, RequestStatus.FINISHED_ERROR)

    def close(self) -> None:
        self.backend.close()


def request_metrics(request: Request) -> dict[str, float]:
    """A finished request's stamps (monotonic seconds: arrival_time and those of first_scheduled_time,
    first_token_time, last_token_time, finished_time that were set) and counts (num_cached_tokens,
    num_prompt_tokens, num_generation_tokens, num_preemptions). The output processor derives latencies from them."""
    metrics = {"arrival_time": request.arrival_time, "num_generation_tokens": float(request.num_output_tokens)}
    for name in ("num_cached_tokens", "num_prompt_tokens", "num_preemptions"):
        metrics[name] = float(getattr(request, name))
    for name in ("first_scheduled_time", "first_token_time", "last_token_time", "finished_time"):
        if getattr(request, name) is not None:
            metrics[name] = getattr(request, name)
    return metrics
