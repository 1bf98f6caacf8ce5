"""The engine for servers: the step loop runs in its own thread, callers await per-request async streams.

The event loop never runs model code. Commands (add, abort) cross into the engine thread through a queue and
are applied between steps; each step's outputs cross back in one `call_soon_threadsafe` hand-off. Per-request
streams are touched only on the event loop (as vLLM's AsyncLLM does), so they need no lock. A stream that is
closed early (the client went away) aborts its request at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ernie_serve.core.config import EngineSettings
from ernie_serve.core.request import RequestOutput
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.core.scheduler import SchedulerStats
from ernie_serve.engine import Engine

log = structlog.get_logger("ernie_serve.async_engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a crash); no more requests can be served."""


class EngineHungError(RuntimeError):
    """A step ran longer than `--engine-step-timeout`: the engine is given up on."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (an exception in its step, logged with its traceback); it goes on
    serving the others."""


class RequestRejectedError(ValueError):
    """The engine refused request `index` of those added together (`error` says why); none of them was kept."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class OutputStream:
    """The outputs of requests added together, in the order steps produce them: `(index, output)`, where
    `index` is the request's position in `add_requests` and `output` its cumulative `RequestOutput`.
    Iteration ends once every request has finished; an engine failure is raised (`RequestFailedError` for a
    request the engine failed, `EngineDeadError` when it stopped). `aclose()` aborts the unfinished ones:
    the gateway calls it however a response ends."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue) -> None:
        self._engine = engine
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._unfinished = set(request_ids)
        self._queue = queue
        self._closed = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
            if not self._unfinished:
                self._release()
        return self._index[item.request_id], item

    async def aclose(self) -> None:
        """Stop listening: the requests not finished yet are aborted (without waiting for the engine)."""
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request_id in self._index:
            self._engine._drop_stream(request_id)
        if self._unfinished and not self._engine._stopping.is_set():
            self._engine._abort_later(sorted(self._unfinished, key=self._index.__getitem__))


@dataclass
class EngineSnapshot:
    """Engine statistics as of the last step, safe to read from the event loop."""

    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
    steps: int = 0
    last_step_seconds: float = 0.0


_Command = Callable[[Engine], Any]


def _done() -> concurrent.futures.Future[Any]:
    """A future nobody awaits, for fire-and-forget commands."""
    return concurrent.futures.Future()


class AsyncEngine:
    """Owns an `Engine` in a background thread. Create it, then `await start()` (loading happens off the loop)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.snapshot = EngineSnapshot()
        self._commands: queue.SimpleQueue[tuple[_Command, concurrent.futures.Future]] = queue.SimpleQueue()
        # Only touched on the event loop: per-request queues, and an event set whenever none is left.
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._no_streams = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._step_started: float | None = None  # monotonic start of the step in progress, for the watchdog
        self._dead: asyncio.Future[BaseException] | None = None  # set on the loop when the engine stops for good
        self._watchdog: asyncio.Task[None] | None = None

    # ----- lifecycle -----
    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and the loop runs, until shutdown or a crash."""
        return self._ready.is_set() and not self._stopping.is_set() and self._error is None

    @property
    def is_loading(self) -> bool:
        """True from construction until the model has loaded (or failed to)."""
        return not self._ready.is_set() and self._error is None

    async def start(self) -> None:
        """Load the engine in its thread and wait until it can serve; re-raises load errors."""
        self._loop = asyncio.get_running_loop()
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name="ernie-serve-engine", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(loaded)
        self._dead = self._loop.create_future()
        self._watchdog = self._loop.create_task(self._watch_steps())

    async def wait_dead(self) -> BaseException:
        """Returns, with the cause, once the engine has stopped for good while serving (a crash, a fatal
        backend error, a hung step); never while it runs. Not after a normal shutdown."""
        assert self._dead is not None, "start() first"
        return await self._dead

    def _declare_dead(self, error: BaseException) -> None:
        """On the event loop: the engine cannot go on. Every waiting stream ends with an error, `is_ready`
        turns false (so /health answers 503), and `wait_dead` returns."""
        if self._error is None:
            self._error = error
        self._fail_streams(EngineDeadError(f"the engine stopped: {error}"))
        if self._dead is not None and not self._dead.done():
            self._dead.set_result(error)

    async def _watch_steps(self) -> None:
        """Declare the engine dead when one step runs longer than the step timeout (a hung backend or
        worker): its thread cannot be interrupted, but the process can exit and be restarted."""
        timeout = self.settings.engine_step_timeout
        while self._error is None and not self._stopping.is_set():
            await asyncio.sleep(min(timeout / 4, 5.0))
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                log.error("an engine step is hung", timeout_s=timeout)
                self._declare_dead(EngineHungError(f"an engine step ran for more than {timeout:g} s"))
            elif self.engine is not None:
                try:  # e.g. a tensor-parallel worker that died while the engine was idle
                    self.engine.core.backend.check_health()
                except Exception as exc:
                    log.error("the backend can no longer serve", error=str(exc))
                    self._declare_dead(exc)

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Let in-flight requests finish for up to `timeout` seconds, abort the rest, stop the thread."""
        if self._streams:
            self._no_streams.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_streams.wait(), timeout)
        if self._streams:
            await self.abort(list(self._streams))
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._commands.put((lambda engine: None, _done()))  # wake the thread
        if self._thread is not None and not isinstance(self._error, EngineHungError):
            await asyncio.to_thread(self._thread.join, 30)  # a hung step never returns: do not wait for it

    # ----- requests -----
    @property
    def tokenizer(self):
        assert self.engine is not None
        return self.engine.tokenizer

    @property
    def weight_bytes(self) -> dict[str, int]:
        """The model's resident weight bytes by kind (`quantized`, `full_precision`, ...); empty until loaded."""
        return self.engine.weight_bytes if self.engine is not None and self._ready.is_set() else {}

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None
        return self.engine.max_model_len

    async def add_requests(
        self,
        prompts: Sequence[tuple[list[int], str | None]],
        sampling_params: SamplingParams,
        request_ids: Sequence[str],
        priority: int = 0,
    ) -> OutputStream:
        """Add requests together (one API call's prompts: `(token ids, text or None)` each) and return one
        stream of their outputs. Returns once the engine has taken every one of them; if it refuses one (too
        long, bad ids), none is kept and `RequestRejectedError` says which. Called by the gateway for every
        API call, before its response starts. A `structured_outputs` spec that does not compile raises its
        `SamplingParamsError` (a `ValueError`)."""
        arrival = time.monotonic()  # the wait in the command queue counts toward the requests' latencies
        grammar = None
        if sampling_params.structured_outputs is not None:
            # Compiled on a worker thread (cached per spec): neither the event loop nor the engine's steps wait for
            # it. A spec that does not compile is a `SamplingParamsError`, before anything is added.
            if self.engine is None or not self.is_ready:
                raise EngineDeadError("the engine is not running") from self._error
            compile_spec = self.engine.structured_outputs.compile
            grammar = await asyncio.to_thread(compile_spec, sampling_params.structured_outputs)
        ids = list(request_ids)
        if len(set(ids)) != len(ids) or any(i in self._streams for i in ids):
            raise ValueError(f"request ids {ids!r} are already in use")
        shared: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        for request_id in ids:
            self._streams[request_id] = shared
        self._no_streams.clear()

        def add_all(engine: Engine) -> None:
            for index, ((token_ids, text), request_id) in enumerate(zip(prompts, ids, strict=True)):
                try:
                    engine.add_request(
                        token_ids, sampling_params, request_id, text, priority, arrival_time=arrival, grammar=grammar
                    )
                except Exception as exc:
                    engine.abort_request(ids[:index])  # all or none: the call gets one answer
                    raise RequestRejectedError(index, exc) from exc

        try:
            await self._call(add_all)
        except BaseException as exc:
            for request_id in ids:
                self._drop_stream(request_id)
            if not isinstance(exc, Exception) and not self._stopping.is_set():
                # Cancelled while the add was in flight (the client left): the engine may still add them.
                self._abort_later(ids)
            raise
        return OutputStream(self, ids, shared)

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """One request's cumulative outputs as steps produce them; the last has `finished`. Validation
        errors (too long, bad ids) are raised before the first yield. Closing the iterator early aborts the
        request."""
        try:
            stream = await self.add_requests([(prompt_token_ids, prompt)], sampling_params, [request_id], priority)
        except RequestRejectedError as exc:
            raise exc.error from None
        async with contextlib.aclosing(stream):
            async for _, output in stream:
                yield output

    def _drop_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams:
            self._no_streams.set()

    def _abort_later(self, request_ids: list[str]) -> None:
        """Queue an abort for the engine thread without waiting for it (from cleanup code)."""
        self._commands.put((lambda engine: engine.abort_request(request_ids), _done()))

    async def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests; their streams end with a last output whose finish_reason is "abort"."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        await self._call(lambda engine: engine.abort_request(ids))

    async def _call(self, command: _Command) -> Any:
        """Run `command(engine)` in the engine thread between steps and return its result."""
        if not self.is_ready:
            raise EngineDeadError("the engine is not running") from self._error
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put((command, future))
        return await asyncio.wrap_future(future)

    # ----- the engine thread -----
    def _run(self, loaded: concurrent.futures.Future[None]) -> None:
        try:
            self.engine = Engine(self.settings)
        except BaseException as exc:
            self._error = exc
            loaded.set_exception(exc)
            return
        self._ready.set()
        loaded.set_result(None)
        engine = self.engine
        try:
            while not self._stopping.is_set():
                self._apply_commands(block=not engine.has_unfinished_requests())
                if engine.has_unfinished_requests():
                    started = time.perf_counter()
                    self._step_started = time.monotonic()
                    outputs = engine.step()
                    self._step_started = None
                    self.snapshot = EngineSnapshot(
                        engine.core.scheduler.stats(), self.snapshot.steps + 1, time.perf_counter() - started
                    )
                    self._deliver(outputs)
                else:  # aborts applied while idle still change the counts
                    self.snapshot = EngineSnapshot(engine.core.scheduler.stats(), self.snapshot.steps, 0.0)
        except BaseException as exc:  # a crash (or a fatal backend error) must fail every client, not hang them
            self._error = exc
            log.exception("engine loop crashed")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._declare_dead, exc)
        finally:
            # answer commands that raced with shutdown, so no caller awaits forever
            while True:
                try:
                    _, future = self._commands.get_nowait()
                except queue.Empty:
                    break
                if not future.done():
                    future.set_exception(EngineDeadError("the engine stopped"))
            engine.close()

    def _apply_commands(self, block: bool) -> None:
        try:
            command, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                result = command(self.engine)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """In the engine thread: hand one step's outputs to the event loop in a single call."""
        if outputs:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: each output to its request's stream (gone if the caller stopped listening). A
        request the engine failed ends its stream with `RequestFailedError`."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished and any(c.finish_reason == "error" for c in output.outputs):
                stream.put_nowait(RequestFailedError("the engine failed this request; the server log has why"))
            else:
                stream.put_nowait(output)

    def _fail_streams(self, error: BaseException) -> None:
        """On the event loop: end every open stream with `error`."""
        for stream in self._streams.values():
            stream.put_nowait(error)
