"""The synchronous engine: requests in, one `schedule -> execute -> sample -> update` step at a time, outputs out.

Used directly by the offline `LLM` API; the async engine runs the same steps off the event loop.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import structlog

from ernie_serve.core.backend import Backend, BackendUnavailableError
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.plan import StepResult
from ernie_serve.core.plugins import get_backend_class, get_scheduler_class
from ernie_serve.core.request import (
    CompletionOutput,
    Request,
    RequestOutput,
    RequestStatus,
    SampleLogprobs,
)
from ernie_serve.core.sampler import Sampler, SamplingState
from ernie_serve.core.sampling_params import SamplingParams, SamplingParamsError
from ernie_serve.core.scheduler import Scheduler, SchedulerConfig
from ernie_serve.detokenizer import IncrementalDetokenizer
from ernie_serve.models import resolve_model
from ernie_serve.tokenizer import Tokenizer

log = structlog.get_logger("ernie_serve.engine")

# Without an explicit size, the CPU KV pool takes at most this much memory.
DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


class PromptTooLongError(SamplingParamsError):
    """Prompt plus max_tokens over the context limit (the gateway answers 400)."""


@dataclass
class _Sequence:
    """Engine-side companions of one scheduled request."""

    request: Request
    detokenizer: IncrementalDetokenizer
    sampling: SamplingState
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None


@dataclass
class _Group:
    """The `n` sequences of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]


class Engine:
    """Owns the backend, scheduler, sampler and tokenizer. Not thread-safe: one caller steps it."""

    def __init__(self, settings: EngineSettings) -> None:
        from ernie_serve.logging import ensure_logging

        ensure_logging()
        started = time.monotonic()
        self.settings = settings
        resolved = resolve_model(settings)
        self.model_config = resolved.config
        self.generation_defaults = resolved.generation_defaults
        self.tokenizer = Tokenizer.from_pretrained(resolved.tokenizer_path, chat_template=settings.chat_template)
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids | set(self.model_config.eos_token_ids))

        backend_cls = get_backend_class(settings.backend)
        unavailable = backend_cls.availability()
        if unavailable:
            raise BackendUnavailableError(f"backend {settings.backend!r} cannot run here: {unavailable}")
        self.backend: Backend = backend_cls()
        self.backend.load(self.model_config, settings, resolved.weights_path)

        num_blocks, self.max_model_len = self._size_kv_pool()
        self.backend.allocate_kv_cache(num_blocks, settings.block_size)
        scheduler_cls = get_scheduler_class(settings.scheduler)
        self.scheduler: Scheduler = scheduler_cls(
            SchedulerConfig(
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=settings.block_size,
                num_blocks=num_blocks,
                enable_chunked_prefill=settings.enable_chunked_prefill,
                enable_prefix_caching=settings.enable_prefix_caching and backend_cls.supports_prefix_caching,
            )
        )
        if settings.enable_prefix_caching and not backend_cls.supports_prefix_caching:
            log.info("prefix caching turned off: this backend keeps one KV cache per request", backend=settings.backend)
        self.sampler = Sampler(settings.seed)
        self._sequences: dict[str, _Sequence] = {}
        self._groups: dict[str, _Group] = {}
        self._parent_of: dict[str, str] = {}
        self._ids = itertools.count()
        log.info(
            "engine ready",
            model=settings.model,
            backend=settings.backend,
            scheduler=settings.scheduler,
            parameters=self.model_config.num_parameters,
            kv_blocks=num_blocks,
            kv_tokens=num_blocks * settings.block_size,
            max_model_len=self.max_model_len,
            seconds=round(time.monotonic() - started, 2),
        )

    def _size_kv_pool(self) -> tuple[int, int]:
        """Blocks from an explicit count or byte size, else free GPU memory, else a CPU default; then cap the
        context limit to what the pool can hold for one request."""
        s, spec = self.settings, self.backend.kv_cache_spec()
        bytes_per_block = spec.bytes_per_token * s.block_size
        model_len = min(
            s.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        if s.num_gpu_blocks_override:
            num_blocks = s.num_gpu_blocks_override
        elif s.kv_cache_memory_bytes:
            num_blocks = s.kv_cache_memory_bytes // bytes_per_block
        elif spec.device_free_bytes is not None:
            num_blocks = int(spec.device_free_bytes * s.gpu_memory_utilization) // bytes_per_block
        else:
            wanted = s.max_num_seqs * -(-model_len // s.block_size)
            num_blocks = min(wanted, DEFAULT_CPU_KV_CACHE_BYTES // bytes_per_block)
        if not s.enable_chunked_prefill and s.max_num_batched_tokens < model_len:
            model_len = s.max_num_batched_tokens  # without chunking, a whole prompt must fit one step
            if s.max_model_len and s.max_model_len > model_len:
                raise ValueError(
                    f"--max-model-len {s.max_model_len} exceeds --max-num-batched-tokens {s.max_num_batched_tokens}"
                    " with chunked prefill off: a prompt that long could never be scheduled; raise the step budget"
                    " or enable chunked prefill"
                )
        if num_blocks < 1:
            raise ValueError("the KV cache budget is smaller than one block; raise --kv-cache-memory-bytes")
        if model_len > num_blocks * s.block_size:
            if s.max_model_len:
                raise ValueError(
                    f"--max-model-len {s.max_model_len} needs {-(-s.max_model_len // s.block_size)} KV blocks "
                    f"but the pool holds {num_blocks}; lower it or give the KV cache more memory"
                )
            model_len = num_blocks * s.block_size
        return num_blocks, model_len

    # ----- requests -----
    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. Raises `SamplingParamsError` for a request that cannot fit."""
        params = (sampling_params or SamplingParams()).with_defaults(
            self.generation_defaults.get("temperature"), self.generation_defaults.get("top_p")
        )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise SamplingParamsError("prompt", "the prompt is empty")
        room = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is None:
            if room < 1:
                raise PromptTooLongError("prompt", self._too_long_message(len(prompt_token_ids), 1))
            params = replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise PromptTooLongError("max_tokens", self._too_long_message(len(prompt_token_ids), params.max_tokens))
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise SamplingParamsError("prompt", f"prompt token ids must be in [0, {vocab})")

        child_ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        sequences = []
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                child_params = replace(params, n=1, seed=seed)
            request = Request(
                request_id=child_id,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                priority=priority,
            )
            sequences.append(
                _Sequence(
                    request=request,
                    detokenizer=IncrementalDetokenizer(
                        self.tokenizer,
                        prompt_token_ids,
                        stop=child_params.stop,
                        include_stop_str_in_output=child_params.include_stop_str_in_output,
                        skip_special_tokens=child_params.skip_special_tokens,
                    ),
                    sampling=self.sampler.new_state(child_params.seed),
                    logprobs=[] if child_params.logprobs is not None else None,
                    cumulative_logprob=0.0 if child_params.logprobs is not None else None,
                )
            )
        # Everything that can fail is built; only now does the request become visible, all n or none.
        added: list[str] = []
        try:
            for seq in sequences:
                self.scheduler.add_request(seq.request)
                added.append(seq.request.request_id)
        except Exception:
            self.scheduler.abort_requests(added, RequestStatus.FINISHED_ABORTED)
            raise
        for seq in sequences:
            self._sequences[seq.request.request_id] = seq
            self._parent_of[seq.request.request_id] = request_id
        self._groups[request_id] = _Group(request_id, prompt, list(prompt_token_ids), child_ids)
        return request_id

    def _too_long_message(self, prompt_len: int, max_tokens: int) -> str:
        return (
            f"this model's maximum context length is {self.max_model_len} tokens, but the request asks for "
            f"{prompt_len + max_tokens} ({prompt_len} in the prompt plus {max_tokens} to generate)"
        )

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort user requests (all their `n` sequences); blocks are freed before the next step."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        children = [c for rid in ids if rid in self._groups for c in self._groups[rid].child_ids]
        aborted = self.scheduler.abort_requests(children, RequestStatus.FINISHED_ABORTED)
        self.backend.release([r.request_id for r in aborted])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----- the step -----
    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for every user request that advanced (cumulative, vLLM-style).
        Requests finished since the last step (aborts included) come back with `finished=True` once."""
        plan = self.scheduler.schedule()
        touched: set[str] = set(plan.finished_request_ids)
        result = StepResult()
        if plan.is_empty and plan.preempted_request_ids:
            self.backend.release(plan.preempted_request_ids)
        if not plan.is_empty:
            logits = self.backend.execute(plan)
            sampling_ids = plan.sampling_request_ids
            requests = [self._sequences[i].request for i in sampling_ids]
            states = [self._sequences[i].sampling for i in sampling_ids]
            sampled = self.sampler(logits, requests, states)
            result.sampled = dict(zip(sampling_ids, sampled, strict=True))
        ended = [r.request_id for r in self.scheduler.update(plan, result)]

        now = time.monotonic()
        stopped_by_string: list[str] = []
        for request_id, token in result.sampled.items():
            seq = self._sequences[request_id]
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            if seq.logprobs is not None and token.logprobs is not None:
                for token_id, entry in token.logprobs.items():
                    entry.decoded_token = self.tokenizer.decode_token(token_id)
                seq.logprobs.append(token.logprobs)
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + token.logprobs[token.token_id].logprob
            hit = seq.detokenizer.add_tokens([token.token_id])
            if hit is not None and not request.is_finished:
                request.stop_reason = hit
                stopped_by_string.append(request_id)
            touched.add(request_id)
        if stopped_by_string:
            self.scheduler.abort_requests(stopped_by_string, RequestStatus.FINISHED_STOPPED)
            ended += stopped_by_string
        if ended:  # free per-request backend state now, not when (or if) the next step runs
            self.backend.release(ended)
        return self._collect_outputs(touched)

    def _collect_outputs(self, child_ids: set[str]) -> list[RequestOutput]:
        outputs = []
        for parent_id in dict.fromkeys(self._parent_of[c] for c in child_ids if c in self._parent_of):
            group = self._groups[parent_id]
            completions = []
            for index, child_id in enumerate(group.child_ids):
                seq = self._sequences[child_id]
                if seq.request.is_finished:
                    seq.detokenizer.finish()
                completions.append(
                    CompletionOutput(
                        index=index,
                        text=seq.detokenizer.output_text,
                        token_ids=list(seq.request.output_token_ids),
                        cumulative_logprob=seq.cumulative_logprob,
                        logprobs=seq.logprobs,
                        finish_reason=seq.request.finish_reason,
                        stop_reason=seq.request.stop_reason,
                    )
                )
            finished = all(c.finish_reason is not None for c in completions)
            outputs.append(
                RequestOutput(
                    request_id=parent_id,
                    prompt=group.prompt,
                    prompt_token_ids=group.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    metrics=self._metrics(group) if finished else None,
                )
            )
            if finished:
                self._release(group)
        return outputs

    def _metrics(self, group: _Group) -> dict[str, float]:
        """Timings of a finished request (monotonic seconds; of its first sequence when n > 1): arrival_time,
        first_scheduled_time, first_token_time, finished_time, queue_time, time_to_first_token, e2e_latency,
        mean_inter_token_latency, num_cached_tokens, num_prompt_tokens, num_generation_tokens."""
        first = self._sequences[group.child_ids[0]].request
        metrics = {
            "arrival_time": first.arrival_time,
            "num_cached_tokens": float(first.num_cached_tokens),
            "num_prompt_tokens": float(first.num_prompt_tokens),
            "num_generation_tokens": float(sum(self._sequences[c].request.num_output_tokens for c in group.child_ids)),
            "num_preemptions": float(first.num_preemptions),
        }
        for name in ("first_scheduled_time", "first_token_time", "finished_time"):
            value = getattr(first, name)
            if value is not None:
                metrics[name] = value
        if first.first_scheduled_time is not None:
            metrics["queue_time"] = first.first_scheduled_time - first.arrival_time
        if first.first_token_time is not None:
            metrics["time_to_first_token"] = first.first_token_time - first.arrival_time
        if first.finished_time is not None:
            metrics["e2e_latency"] = first.finished_time - first.arrival_time
        if first.first_token_time is not None and first.last_token_time is not None and first.num_output_tokens > 1:
            # the gaps between successive tokens add up to last minus first
            gaps = first.num_output_tokens - 1
            metrics["mean_inter_token_latency"] = (first.last_token_time - first.first_token_time) / gaps
        return metrics

    def _release(self, group: _Group) -> None:
        for child_id in group.child_ids:
            self._sequences.pop(child_id, None)
            self._parent_of.pop(child_id, None)
        self._groups.pop(group.request_id, None)

    def close(self) -> None:
        self.backend.close()


__all__ = ["Engine", "PromptTooLongError"]
