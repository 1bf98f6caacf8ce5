"""The OpenAI endpoints: a request body in, engine requests out, a JSON body or an SSE stream back.

The gateway knows the engine only through `AsyncEngine`'s async API. A client that goes away aborts its
engine requests at once: non-streaming handlers race the generation against the ASGI `http.disconnect`
message; streaming responses are cancelled by Starlette on disconnect, which closes the call's output stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ernie_serve.async_engine import (
    AsyncEngine,
    EngineDeadError,
    OutputStream,
    RequestFailedError,
    RequestRejectedError,
)
from ernie_serve.core.request import CompletionOutput, Logprob, RequestOutput, SampleLogprobs
from ernie_serve.core.sampling_params import SamplingParams, SamplingParamsError
from ernie_serve.gateway import sse
from ernie_serve.gateway.auth import request_id as scope_request_id
from ernie_serve.gateway.chat_plan import ChatPlan, ServerParsers, finish_reason, plan_chat, tool_call_out
from ernie_serve.gateway.errors import APIError, bad_request, from_validation_error
from ernie_serve.gateway.metrics import GatewayMetrics, RequestTracker
from ernie_serve.gateway.parsers import ChoiceParser, ParsedOutput, StreamedParse
from ernie_serve.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    SamplingRequest,
    TopLogprob,
    UsageInfo,
    unsupported_parameter,
)
from ernie_serve.output_processor import merge_metrics

log = structlog.get_logger("ernie_serve.gateway")

T = TypeVar("T")
RequestTransform = Callable[[Any], Any]

# JSON has no -inf; vLLM reports impossible tokens with this floor too.
_MIN_LOGPROB = -9999.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


@dataclass
class _Call:
    """One API call in flight: what the drain, the metrics and the request log need."""

    id: str  # the response id ("chatcmpl-..." / "cmpl-...")
    request_id: str  # X-Request-Id
    endpoint: str
    tracker: RequestTracker
    engine_ids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    engine_metrics: dict[str, float] | None = None


def _clamp(logprob: float) -> float:
    return logprob if logprob > _MIN_LOGPROB else _MIN_LOGPROB


def chat_logprobs(token_ids: Sequence[int], entries: SampleLogprobs, top_k: int) -> list[ChatTokenLogprob]:
    """OpenAI's chat `logprobs.content` for generated tokens: each token with its `top_k` alternatives. Every
    entry holds the generated token and its candidates' texts (the engine's output processor fills them)."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        tops = sorted((lp for lp in entry.values() if lp.rank <= top_k), key=lambda lp: lp.rank)
        content.append(
            ChatTokenLogprob(
                token=_text(chosen),
                logprob=_clamp(chosen.logprob),
                bytes=list(_text(chosen).encode()),
                top_logprobs=[
                    TopLogprob(token=_text(lp), logprob=_clamp(lp.logprob), bytes=list(_text(lp).encode()))
                    for lp in tops[:top_k]
                ],
            )
        )
    return content


def completion_logprobs(
    token_ids: Sequence[int], entries: SampleLogprobs, top_k: int, offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy completions `logprobs`: tokens, their logprobs, top alternatives, text offsets."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        result.tokens.append(_text(chosen))
        result.token_logprobs.append(_clamp(chosen.logprob))
        tops = {_text(lp): _clamp(lp.logprob) for tid, lp in entry.items() if lp.rank <= top_k or tid == token_id}
        result.top_logprobs.append(tops)
        result.text_offset.append(offset)
        offset += len(_text(chosen))
    return result


def _text(logprob: Logprob) -> str:
    return logprob.decoded_token or ""


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. Only call once the body is read: then the server's next message
    can only be `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or cancel it and raise `ClientDisconnected` as soon as the client goes away."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class EventStream(StreamingResponse):
    """An SSE response that always closes its body iterator, however the response ends (client gone,
    server shutdown), so the generator's cleanup (engine abort, metrics, request log) runs at once."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class OpenAIServing:
    """Handlers for `/v1/chat/completions` and `/v1/completions`, sharing one engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: GatewayMetrics,
        model_name: str,
        max_concurrency: int | None = None,
        transforms: Sequence[tuple[str, RequestTransform]] = (),
        accepted_model_names: Sequence[str] = (),
        parsers: ServerParsers | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.model_names = {model_name, *accepted_model_names}
        self.max_concurrency = max_concurrency
        self.transforms = list(transforms)
        self.parsers = parsers or ServerParsers()  # --reasoning-parser, --tool-call-parser
        self.active: dict[str, _Call] = {}
        self.draining = False
        self._drained = asyncio.Event()

    # ----- lifecycle -----
    async def drain(self, timeout: float) -> None:
        """Called on SIGTERM: refuse new calls, let the running ones finish for up to `timeout` seconds, then
        abort the rest (their streams end with finish_reason "abort")."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active and self.engine.is_ready:
            ids = [i for call in self.active.values() for i in call.engine_ids]
            log.warning("shutdown timeout: aborting requests still running", requests=len(self.active))
            with contextlib.suppress(EngineDeadError):
                await self.engine.abort(ids)

    def _check_available(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not self.engine.is_ready:
            raise APIError(503, "the model is not ready: it is loading, or the engine stopped", code="not_ready")
        if self.max_concurrency is not None and len(self.active) >= self.max_concurrency:
            raise APIError(
                429,
                f"too many concurrent requests: this server takes {self.max_concurrency} at a time; retry later",
                code="rate_limit_exceeded",
            )

    def _check_model(self, request: SamplingRequest) -> None:
        if request.model is not None and request.model not in self.model_names:
            raise APIError(404, f"the model '{request.model}' does not exist", param="model", code="model_not_found")

    def _begin(self, call: _Call) -> None:
        self.active[call.id] = call

    def _reject(self, call: _Call) -> None:
        """The engine refused the request when it was added (a 400): it only gives its slot back."""
        self.active.pop(call.id, None)

    def _end(self, call: _Call, reason: str) -> None:
        """Once per call, however it ended: metrics, the request log line, the concurrency slot."""
        if self.active.pop(call.id, None) is None:
            return
        duration = call.tracker.finish(reason, call.prompt_tokens, call.output_tokens, call.engine_metrics)
        ttft = call.tracker.ttft
        log.info(
            "request finished",
            id=call.id,
            request_id=call.request_id,
            endpoint=call.endpoint,
            prompt_tokens=call.prompt_tokens,
            output_tokens=call.output_tokens,
            ttft_s=None if ttft is None else round(ttft, 4),
            duration_s=round(duration, 4),
            finish_reason=reason,
        )

    # ----- common steps -----
    async def _parse(self, request: Request, model: type[SamplingRequest]) -> Any:
        self._check_available()
        body = await request.body()
        try:
            # Off the event loop: parsing a body of several MB takes long enough to stall every other stream.
            parsed = await anyio.to_thread.run_sync(model.model_validate_json, body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        unsupported = unsupported_parameter(parsed)
        if unsupported is not None:
            raise bad_request(unsupported[1], unsupported[0])
        self._check_model(parsed)
        return parsed

    @staticmethod
    def _params(parsed: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        try:
            return parsed.sampling_params()
        except SamplingParamsError as exc:
            raise _renamed(bad_request(str(exc), exc.param), parsed) from None

    async def _submit(
        self,
        request: Request,
        call: _Call,
        prompts: list[tuple[list[int], str | None]],
        params: SamplingParams,
        priority: int,
    ) -> OutputStream | None:
        """Add the call's requests to the engine, which validates them (length, token ids) as it takes them,
        so its refusals become 400s before any response starts. None: the client went away (the call is
        ended as aborted)."""
        try:
            try:
                return await until_disconnect(
                    request, self.engine.add_requests(prompts, params, call.engine_ids, priority)
                )
            except RequestRejectedError as exc:
                raise _rejection(exc, len(prompts)) from None
            except EngineDeadError:
                raise APIError(503, "the engine is not running", code="not_ready") from None
            except ValueError as exc:  # a structured-output spec the grammar backend cannot compile, ...
                raise bad_request(str(exc), getattr(exc, "param", None)) from None
        except ClientDisconnected:
            self._end(call, "abort")
            return None
        except BaseException:
            self._reject(call)
            raise

    async def _final_outputs(self, request: Request, call: _Call, stream: OutputStream) -> list[RequestOutput] | None:
        """Every request's last output, for a response that is not streamed; the stream is closed either
        way. None: the client went away (the call is ended as aborted)."""

        async def collect() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(call.engine_ids)
            seen = [0] * len(call.engine_ids)
            async for index, output in stream:
                seen[index] = self._count_new(call, output, seen[index])
                if output.finished:
                    finals[index] = output
            assert all(final is not None for final in finals), "a stream ended before its requests finished"
            return finals  # type: ignore[return-value]

        try:
            return await until_disconnect(request, collect())
        except ClientDisconnected:
            self._end(call, "abort")
            return None
        except EngineDeadError:
            self._end(call, "error")
            raise APIError(503, "the engine stopped while generating", code="not_ready") from None
        except RequestFailedError as exc:
            self._end(call, "error")
            raise APIError(500, str(exc), code="internal_error") from None
        except BaseException:
            self._end(call, "error")
            raise
        finally:
            await stream.aclose()

    async def _apply_transforms(self, parsed: ChatCompletionRequest) -> ChatCompletionRequest:
        for name, transform in self.transforms:
            try:
                result = transform(parsed)
                if inspect.isawaitable(result):
                    result = await result
                if isinstance(result, dict):
                    result = ChatCompletionRequest.model_validate(result)
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            except ValueError as exc:
                raise bad_request(str(exc), getattr(exc, "param", None)) from None
            if not isinstance(result, ChatCompletionRequest):
                raise TypeError(f"request transform {name!r} returned {type(result).__name__}, not the request")
            parsed = result
        return parsed

    def _special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is one special token (grammars match those by id), else None."""
        token = self.engine.tokenizer.token_to_id(text)
        return token if token is not None and token in self.engine.tokenizer.all_special_ids else None

    def _render_chat(self, parsed: ChatCompletionRequest, plan: ChatPlan) -> tuple[str, list[int]]:
        """The prompt text and its token ids; called in a worker thread by `chat`."""
        tokenizer = self.engine.tokenizer
        try:
            prompt = tokenizer.apply_chat_template(
                [m.for_template() for m in parsed.messages],
                add_generation_prompt=parsed.add_generation_prompt,
                **plan.template_variables,
            )
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        return prompt, tokenizer.encode(prompt)

    def _encode_prompts(self, parsed: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """Each prompt as (its text or None, its token ids); called in a worker thread by `completions`."""
        tokenizer = self.engine.tokenizer
        return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in parsed.prompts()]

    # ----- /v1/chat/completions -----
    async def chat(self, request: Request) -> Response:
        parsed: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        parsed = await self._apply_transforms(parsed)
        tokenizer = self.engine.tokenizer
        plan = plan_chat(parsed, self.parsers, self._special_token_id)
        params = plan.constrain(self._params(parsed), tokenizer.encode)
        # Templating and tokenizing a long conversation take seconds: in a worker thread, so /health and the
        # other streams keep being served meanwhile (the tokenizer is immutable, any thread may use it).
        prompt, prompt_ids = await anyio.to_thread.run_sync(self._render_chat, parsed, plan)
        self._check_available()  # the checks again: the body may have taken a while to arrive
        call = _Call(f"chatcmpl-{uuid.uuid4().hex}", scope_request_id(request.scope), "chat", self.metrics.track())
        call.engine_ids = [call.id]
        call.prompt_tokens = len(prompt_ids)
        self._begin(call)
        try:
            stream = await self._submit(request, call, [(prompt_ids, prompt)], params, parsed.priority)
        except APIError as exc:
            if exc.param == "max_tokens" and parsed.max_completion_tokens is not None:
                exc.param = "max_completion_tokens"  # the engine knows one name; the caller used the other
            if exc.param == "structured_outputs" and plan.grammar is not None:
                exc.param = "tools"  # the grammar that enforces tool_choice was built from them
            raise _renamed(exc, parsed) from None
        if stream is None:
            return Response(status_code=499)
        if parsed.stream:
            return EventStream(self._chat_stream(call, parsed, stream, plan))
        finals = await self._final_outputs(request, call, stream)
        if finals is None:
            return Response(status_code=499)
        call.engine_metrics = finals[0].metrics
        return JSONResponse(self._chat_response(call, parsed, finals[0], plan).model_dump(mode="json"))

    def _count_new(self, call: _Call, output: RequestOutput, seen: int) -> int:
        total = sum(len(c.token_ids) for c in output.outputs)
        if total > seen:
            call.tracker.output(output.metrics)
        return total

    def _chat_response(
        self, call: _Call, parsed: ChatCompletionRequest, final: RequestOutput, plan: ChatPlan
    ) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if parsed.logprobs and c.logprobs is not None:
                logprobs = ChatLogprobs(content=chat_logprobs(c.token_ids, c.logprobs, parsed.top_logprobs or 0))
            message, reason = ChatResponseMessage(content=c.text), c.finish_reason
            if plan.parses:
                out = plan.choice_parser().parse(c.text, finished=True)
                reasoning = out.reasoning or None if plan.reasoning is not None else None
                message = ChatResponseMessage(
                    # null rather than "" next to reasoning or calls, as OpenAI answers a turn without text
                    content=out.content or (None if reasoning or out.tool_calls else ""),
                    reasoning_content=reasoning,
                    reasoning=reasoning,
                    tool_calls=[tool_call_out(tc) for tc in out.tool_calls],
                )
                reason = finish_reason(reason, bool(out.tool_calls))
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=c.stop_reason,
                )
            )
        call.output_tokens = sum(len(c.token_ids) for c in final.outputs)
        self._end(call, _reason(final.outputs))
        return ChatCompletionResponse(
            id=call.id,
            model=self.model_name,
            choices=choices,
            usage=_usage(call.prompt_tokens, call.output_tokens),
        )

    async def _chat_stream(
        self,
        call: _Call,
        parsed: ChatCompletionRequest,
        stream: OutputStream,
        plan: ChatPlan,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        want_logprobs = parsed.logprobs
        top_k = parsed.top_logprobs or 0
        continuous = parsed.continuous_usage
        n = parsed.n
        progress = [_ChoiceProgress() for _ in range(n)]
        choice_parsers: list[ChoiceParser | None] = [plan.choice_parser() if plan.parses else None for _ in range(n)]
        parsed_sent = [StreamedParse() for _ in range(n)]
        made_calls = [False] * n
        reason = "abort"
        model = self.model_name

        def chunk(choice: ChatCompletionStreamChoice) -> bytes:
            usage = _usage(call.prompt_tokens, _sent_tokens(progress)) if continuous else None
            return sse.encode_data(
                ChatCompletionChunk(id=call.id, created=created, model=model, choices=[choice], usage=usage)
            )

        try:
            for i in range(n):
                yield chunk(ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for _, output in stream:
                new_tokens = False
                for c in output.outputs:
                    i = c.index
                    if progress[i].done:
                        continue
                    text, first_new, finished = progress[i].advance(c)
                    logprobs = None
                    if len(c.token_ids) > first_new:
                        new_tokens = True
                        if want_logprobs and c.logprobs is not None:
                            logprobs = ChatLogprobs(
                                content=chat_logprobs(c.token_ids[first_new:], c.logprobs[first_new:], top_k)
                            )
                    choice_parser = choice_parsers[i]
                    if choice_parser is None:
                        delta, news = DeltaMessage(content=text), bool(text)
                    else:
                        delta = _parsed_delta(parsed_sent[i], choice_parser.parse(c.text, finished), plan)
                        news = bool(delta.model_dump())
                        made_calls[i] = made_calls[i] or bool(delta.tool_calls)
                    if news or logprobs is not None:
                        yield chunk(ChatCompletionStreamChoice(index=i, delta=delta, logprobs=logprobs))
                    if finished:
                        yield chunk(
                            ChatCompletionStreamChoice(
                                index=i,
                                delta=DeltaMessage(),
                                finish_reason=finish_reason(c.finish_reason, made_calls[i]),
                                stop_reason=c.stop_reason,
                            )
                        )
                if new_tokens:
                    call.tracker.output(output.metrics)
                call.output_tokens = _sent_tokens(progress)
                if output.finished:
                    call.engine_metrics = output.metrics
                    reason = _reason(output.outputs)
            for line in _stream_end(call, created, model, ChatCompletionChunk, parsed.include_usage):
                yield line
        except (EngineDeadError, RequestFailedError) as exc:
            reason = "error"
            for line in _stream_error(exc):
                yield line
        finally:
            await stream.aclose()
            self._end(call, reason)

    # ----- /v1/completions -----
    async def completions(self, request: Request) -> Response:
        parsed: CompletionRequest = await self._parse(request, CompletionRequest)
        params = self._params(parsed)
        tokenizer = self.engine.tokenizer
        prompts = await anyio.to_thread.run_sync(self._encode_prompts, parsed)  # off the loop, as in `chat`
        self._check_available()
        call = _Call(f"cmpl-{uuid.uuid4().hex}", scope_request_id(request.scope), "completions", self.metrics.track())
        call.engine_ids = [call.id] if len(prompts) == 1 else [f"{call.id}-{i}" for i in range(len(prompts))]
        call.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self._begin(call)
        try:
            stream = await self._submit(request, call, [(ids, text) for text, ids in prompts], params, parsed.priority)
        except APIError as exc:
            raise _renamed(exc, parsed) from None
        if stream is None:
            return Response(status_code=499)
        echoes = [(text if text is not None else tokenizer.decode(ids)) if parsed.echo else "" for text, ids in prompts]
        if parsed.stream:
            return EventStream(self._completion_stream(call, parsed, stream, echoes))
        finals = await self._final_outputs(request, call, stream)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(self._completion_response(call, parsed, finals, echoes).model_dump(mode="json"))

    def _completion_response(
        self, call: _Call, parsed: CompletionRequest, finals: list[RequestOutput], echoes: list[str]
    ) -> CompletionResponse:
        choices = []
        for p, final in enumerate(finals):
            for c in final.outputs:
                logprobs = None
                if parsed.logprobs is not None and c.logprobs is not None:
                    logprobs = completion_logprobs(c.token_ids, c.logprobs, parsed.logprobs, len(echoes[p]))
                choices.append(
                    CompletionChoice(
                        index=p * parsed.n + c.index,
                        text=echoes[p] + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        call.output_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
        call.engine_metrics = merge_metrics([f.metrics for f in finals if f.metrics])
        self._end(call, _reason([c for f in finals for c in f.outputs]))
        return CompletionResponse(
            id=call.id, model=self.model_name, choices=choices, usage=_usage(call.prompt_tokens, call.output_tokens)
        )

    async def _completion_stream(
        self,
        call: _Call,
        parsed: CompletionRequest,
        stream: OutputStream,
        echoes: list[str],
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        top_k = parsed.logprobs
        n = parsed.n
        total = n * len(echoes)
        progress = [_ChoiceProgress() for _ in range(total)]
        offsets = [len(echoes[i // n]) for i in range(total)]
        reason = "abort"
        model = self.model_name
        continuous = parsed.continuous_usage

        def chunk(choice: CompletionChoice) -> bytes:
            usage = _usage(call.prompt_tokens, _sent_tokens(progress)) if continuous else None
            return sse.encode_data(
                CompletionResponse(id=call.id, created=created, model=model, choices=[choice], usage=usage)
            )

        finals: list[RequestOutput | None] = [None] * len(echoes)
        try:
            if parsed.echo:
                for index in range(total):
                    if echoes[index // n]:
                        yield chunk(CompletionChoice(index=index, text=echoes[index // n]))
            async for p, output in stream:
                new_tokens = False
                for c in output.outputs:
                    i = p * n + c.index
                    if progress[i].done:
                        continue
                    delta, first_new, finished = progress[i].advance(c)
                    logprobs = None
                    if len(c.token_ids) > first_new:
                        new_tokens = True
                        if top_k is not None and c.logprobs is not None:
                            logprobs = completion_logprobs(
                                c.token_ids[first_new:], c.logprobs[first_new:], top_k, offsets[i]
                            )
                            offsets[i] += sum(len(t) for t in logprobs.tokens)
                    if delta or logprobs is not None or finished:
                        yield chunk(
                            CompletionChoice(
                                index=i,
                                text=delta,
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason,
                            )
                        )
                if new_tokens:
                    call.tracker.output(output.metrics)
                call.output_tokens = _sent_tokens(progress)
                if output.finished:
                    finals[p] = output
            call.engine_metrics = merge_metrics([f.metrics for f in finals if f is not None and f.metrics])
            reason = _reason([c for f in finals if f is not None for c in f.outputs])
            for line in _stream_end(call, created, model, CompletionResponse, parsed.include_usage):
                yield line
        except (EngineDeadError, RequestFailedError) as exc:
            reason = "error"
            for line in _stream_error(exc):
                yield line
        finally:
            await stream.aclose()
            self._end(call, reason)


def _parsed_delta(sent: StreamedParse, output: ParsedOutput, plan: ChatPlan) -> DeltaMessage:
    """The delta of one streamed choice whose text goes through parsers: what its parsed output gained."""
    reasoning, content, calls = sent.advance(output)
    reasoning_text = reasoning if plan.reasoning is not None and reasoning else None
    return DeltaMessage(
        content=content or None,
        reasoning_content=reasoning_text,
        reasoning=reasoning_text,
        tool_calls=[DeltaToolCall(index=k, **tool_call_out(call).model_dump()) for k, call in calls] or None,
    )


@dataclass
class _ChoiceProgress:
    """How much of one streamed choice has been sent."""

    text: int = 0  # characters of its text
    tokens: int = 0  # of its token ids
    done: bool = False  # its finish_reason went out

    def advance(self, output: CompletionOutput) -> tuple[str, int, bool]:
        """Take the choice's latest cumulative output: returns the text to send now, the index of its first
        token not sent before, and whether it finished; everything returned counts as sent. The engine's text
        only grows (it holds back what may still become a stop string), so the new part is its tail."""
        finished = output.finish_reason is not None
        delta = output.text[self.text :]
        self.text = len(output.text)
        first_new, self.tokens = self.tokens, max(self.tokens, len(output.token_ids))
        self.done = finished
        return delta, first_new, finished


def _sent_tokens(progress: list[_ChoiceProgress]) -> int:
    return sum(choice.tokens for choice in progress)


def _stream_end(call: Any, created: int, model: str, chunk_cls: Any, include_usage: bool) -> Iterator[str]:
    """The last SSE lines of a stream: the usage chunk when asked for, then `[DONE]`."""
    if include_usage:
        usage = _usage(call.prompt_tokens, call.output_tokens)
        yield sse.encode_data(chunk_cls(id=call.id, created=created, model=model, choices=[], usage=usage))
    yield sse.DONE


def _stream_error(exc: Exception) -> Iterator[str]:
    """An engine failure mid-stream: an OpenAI-style error event, then `[DONE]`."""
    yield sse.encode_data({"error": {"message": str(exc), "type": "server_error", "param": None, "code": 500}})
    yield sse.DONE


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _reason(outputs: Sequence[CompletionOutput]) -> str:
    """One finish reason for the call (metrics and the log): an abort wins, else the first choice's."""
    reasons = [c.finish_reason or "abort" for c in outputs]
    if "abort" in reasons:
        return "abort"
    return reasons[0] if reasons else "abort"


def _renamed(error: APIError, parsed: SamplingRequest) -> APIError:
    """The engine names a structured-output error `structured_outputs`; the caller may have used another field."""
    if error.param == "structured_outputs" and parsed.constraint_field is not None:
        error.param = parsed.constraint_field
    return error


def _rejection(exc: RequestRejectedError, count: int) -> APIError:
    """The 400 for a request the engine refused; with several prompts, it names the prompt's index."""
    error = exc.error
    param = error.param if isinstance(error, SamplingParamsError) else None
    if count == 1:
        return bad_request(str(error), param)
    if param in (None, "prompt"):
        param = f"prompt[{exc.index}]"
    return bad_request(f"prompt {exc.index}: {error}", param)
