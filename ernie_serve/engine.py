"""The engine callers use: text-aware requests in, vLLM-shaped `RequestOutput`s out, one step at a time.

It resolves the model, loads the tokenizer, validates requests and expands `n`, then drives the engine core
(`ernie_serve.core.engine_core`: schedule -> execute -> sample -> update, tokens only) and hands its outputs
to the output processor (text, stop strings, logprobs, metrics). Used directly by the offline `LLM` API; the
async engine runs the same steps in a thread. Not thread-safe: one caller steps it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from types import TracebackType

import structlog

from ernie_serve.core.config import EngineSettings
from ernie_serve.core.engine_core import EngineCore
from ernie_serve.core.errors import EngineFatalError
from ernie_serve.core.request import Request, RequestOutput, RequestStatus
from ernie_serve.core.sampling_params import SEED_MAX, SamplingParams, SamplingParamsError
from ernie_serve.logging import ensure_logging
from ernie_serve.models import num_parameters, resolve_model
from ernie_serve.output_processor import OutputProcessor
from ernie_serve.structured_output import CompiledGrammar, StructuredOutputs

log = structlog.get_logger("ernie_serve.engine")


class PromptTooLongError(SamplingParamsError):
    """Prompt plus max_tokens over the context limit (the gateway answers 400)."""


class Engine:
    """Owns the tokenizer, the engine core and the output processor."""

    def __init__(self, settings: EngineSettings) -> None:
        ensure_logging()
        started = time.monotonic()
        self.settings = settings
        resolved = resolve_model(settings)
        self.model_config = resolved.config
        self.generation_defaults = resolved.generation_defaults
        self.tokenizer = resolved.load_tokenizer(settings.chat_template)
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids | set(self.model_config.eos_token_ids))
        # before the core: an unknown --structured-outputs-backend is refused before the weights load
        self.structured_outputs = StructuredOutputs(
            settings.structured_outputs_backend, self.tokenizer, self.model_config.vocab_size
        )
        self.core = EngineCore(settings, self.model_config, resolved.weights_path)
        self.max_model_len = self.core.max_model_len
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        log.info(
            "engine ready",
            model=settings.model,
            backend=settings.backend,
            scheduler=settings.scheduler,
            parameters=num_parameters(self.model_config),
            kv_blocks=self.core.num_blocks,
            kv_tokens=self.core.num_blocks * settings.block_size,
            max_model_len=self.max_model_len,
            seconds=round(time.monotonic() - started, 2),
        )

    @property
    def weight_bytes(self) -> dict[str, int]:
        """The backend's resident weight bytes by kind (`quantized`, `full_precision`, ...), fixed once loaded."""
        return self.core.weight_bytes

    # ----- requests -----
    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises `SamplingParamsError` (naming the field) for a request
        that cannot be served: too long, token ids outside the vocabulary, a structured-output spec that does
        not compile. `arrival_time` (monotonic): when the caller received it, if earlier than now (the async
        engine's command queue), for its metrics. `grammar`: `structured_outputs` compiled by the caller (off
        this thread); without it a spec is compiled here."""
        params = (sampling_params or SamplingParams()).with_defaults(
            self.generation_defaults.get("temperature"), self.generation_defaults.get("top_p")
        )
        request_id = request_id or f"req-{next(self._ids)}"
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
        for field, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise SamplingParamsError(field, f"{field} token ids must be in [0, {vocab})")

        if params.structured_outputs is not None and grammar is None:
            grammar = self.structured_outputs.compile(params.structured_outputs)

        child_ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        children = []
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1:  # each completion its own seed, so the n samples differ
                child_params = replace(params, n=1, seed=_child_seed(params.seed, index))
            children.append((child_id, child_params))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.processor.add_request(request_id, prompt, prompt_token_ids, children, arrival)
        # Only now does the request become visible to the scheduler, all n or none.
        added: list[str] = []
        try:
            for child_id, child_params in children:
                request = Request(
                    child_id, list(prompt_token_ids), child_params, self.eos_token_ids, priority, arrival_time=arrival
                )
                # each sequence its own constraints: a matcher's state is its sequence's tokens
                request.logits_processors = [grammar.new_matcher()] if grammar is not None else []
                request.logits_processors += [make() for make in params.logits_processors]
                self.core.add_request(request)
                added.append(child_id)
        except Exception:
            self.core.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            self.processor.forget(request_id)
            raise
        return request_id

    def _too_long_message(self, prompt_len: int, max_tokens: int) -> str:
        return (
            f"this model's maximum context length is {self.max_model_len} tokens, but the request asks for "
            f"{prompt_len + max_tokens} ({prompt_len} in the prompt plus {max_tokens} to generate)"
        )

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort user requests (all their `n` completions); their final outputs (finish_reason "abort") come
        from the next `step`."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        self.processor.process(self.core.finish_requests(self.processor.child_ids(ids), RequestStatus.FINISHED_ABORTED))

    def has_unfinished_requests(self) -> bool:
        """True while a step would do something: requests to run, or finished ones not yet reported."""
        return self.core.has_unfinished_requests() or self.processor.has_pending_outputs()

    # ----- the step -----
    def step(self) -> list[RequestOutput]:
        """Run one step; return a cumulative output for every user request that advanced or ended since the
        last one (a finished request comes back once with `finished=True`). An exception inside the step ends
        that step's requests with finish reason "error" (logged with its traceback) and the engine goes on;
        only an `EngineFatalError` propagates."""
        try:
            core_outputs = self.core.step()
        except EngineFatalError:
            raise
        except Exception:  # a fault in this step fails the step's requests, not the engine
            log.exception("engine step failed; its requests end with an error")
            core_outputs = self.core.fail_step()
        ended = self.processor.process(core_outputs)
        # Requests the processor ended (a stop string: stopped, not aborted; a detokenizer fault: error) end
        # in the core too.
        for status in dict.fromkeys(status for _, status in ended):
            ids = [request_id for request_id, s in ended if s == status]
            self.processor.process(self.core.finish_requests(ids, status))
        return self.processor.collect()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM's `LLM.reset_prefix_cache` does: the next requests compute their
        whole prompts, as on a fresh engine (benchmarks call it between rounds of the same workload). Returns
        False, changing nothing, while requests are unfinished."""
        return not self.has_unfinished_requests() and self.core.scheduler.reset_prefix_cache()

    def close(self) -> None:
        """Release the backend (threads, memory, devices). Called once, when the engine is done."""
        self.core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _child_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th of `n` completions: the request's seed plus the index, wrapped around the
    64-bit range a generator accepts, where x and x - 2**64 are the same seed (so the largest works with n > 1)."""
    if seed is None:
        return None
    child = seed + index
    return child - 2**64 if child > SEED_MAX else child


__all__ = ["Engine", "PromptTooLongError"]
