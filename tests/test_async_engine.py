"""The async engine: the step loop in its own thread, per-request streams on the event loop only."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from ernie_serve.async_engine import AsyncEngine, RequestRejectedError
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.sampling_params import SamplingParams, StructuredOutputsParams
from ernie_serve.structured_output import GrammarCompileError


class _ThreadCheckedDict(dict):  # type: ignore[type-arg]
    """A dict that records which threads read or change it."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())

    def get(self, *args: Any) -> Any:
        self._seen()
        return super().get(*args)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._seen()
        super().__setitem__(key, value)

    def pop(self, *args: Any) -> Any:
        self._seen()
        return super().pop(*args)

    def values(self) -> Any:
        self._seen()
        return super().values()

    def __contains__(self, key: object) -> bool:
        self._seen()
        return super().__contains__(key)

    def __len__(self) -> int:  # also what `if streams:` calls
        self._seen()
        return super().__len__()

    def __iter__(self) -> Any:
        self._seen()
        return super().__iter__()


def test_streams_are_touched_only_on_the_event_loop(tiny_checkpoint) -> None:
    settings = EngineSettings(model=str(tiny_checkpoint("moe_shared_tied", torch.float32)), block_size=4)

    async def scenario() -> tuple[set[int], int, list[str | None]]:
        engine = AsyncEngine(settings)
        await engine.start()
        streams = engine._streams = _ThreadCheckedDict()  # the state bug 3 of issue 9 was about
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        finished = [o async for o in engine.generate([5, 6, 7], greedy, "done") if o.finished]
        reasons = [c.finish_reason for o in finished for c in o.outputs]
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        stream = engine.generate([8, 9], long, "aborted")
        first = await stream.__anext__()
        await engine.abort("aborted")
        reasons += [o.outputs[0].finish_reason async for o in stream if o.finished]
        assert not first.finished
        await engine.shutdown()
        return streams.threads, threading.get_ident(), reasons

    threads, loop_thread, reasons = asyncio.run(scenario())
    assert reasons == ["length", "abort"]
    assert threads == {loop_thread}


def test_requests_added_together_share_one_stream_and_are_refused_together(tiny_checkpoint) -> None:
    settings = EngineSettings(model=str(tiny_checkpoint("moe_shared_tied", torch.float32)), block_size=4)

    async def scenario() -> None:
        engine = AsyncEngine(settings)
        await engine.start()
        try:
            greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            stream = await engine.add_requests([([5, 6], None), ([7, 8, 9], "text")], greedy, ["a", "b"])
            seen = [(index, output.request_id, output.finished) async for index, output in stream]
            assert {(i, rid) for i, rid, _ in seen} == {(0, "a"), (1, "b")}
            assert sorted((i, rid) for i, rid, done in seen if done) == [(0, "a"), (1, "b")]
            assert not engine._streams  # both finished: the stream let go of its requests

            # The second prompt is out of the vocabulary: the call is refused and the first one is not kept.
            bad = [([5, 6], None), ([10**9], None)]
            long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
            with pytest.raises(RequestRejectedError) as refused:
                await engine.add_requests(bad, long, ["c", "d"])
            assert refused.value.index == 1
            assert not engine._streams
            # a kept "c" would still be running (500 tokens) when a short request added next finishes
            again = await engine.add_requests([([5, 6], None)], greedy, ["c2"])
            assert [o.request_id async for _, o in again if o.finished] == ["c2"]
            assert engine.snapshot.scheduler.num_running == 0 and engine.snapshot.scheduler.num_waiting == 0

            # Closing a stream early aborts what has not finished.
            held = await engine.add_requests([([5, 6], None), ([7], None)], long, ["e", "f"])
            await held.__anext__()
            await held.aclose()
            assert not engine._streams
            # the aborts reach the engine between steps; a request added after them runs alone
            last = await engine.add_requests([([9], None)], greedy, ["g"])
            assert [o.request_id async for _, o in last if o.finished] == ["g"]
            assert engine.snapshot.scheduler.num_running == 0
        finally:
            await engine.shutdown()

    asyncio.run(scenario())


def test_structured_output_specs_compile_off_the_loop_and_the_engine_thread(tiny_checkpoint) -> None:
    settings = EngineSettings(model=str(tiny_checkpoint("moe_shared_tied", torch.float32)), block_size=4)

    async def scenario() -> None:
        engine = AsyncEngine(settings)
        await engine.start()
        try:
            assert engine.engine is not None
            compiler = engine.engine.structured_outputs
            compile_in, threads = compiler.compile, []

            def recording(spec: StructuredOutputsParams) -> Any:
                threads.append(threading.current_thread())
                return compile_in(spec)

            compiler.compile = recording  # type: ignore[method-assign]
            params = SamplingParams(
                temperature=1.0,
                seed=1,
                n=2,
                max_tokens=20,
                structured_outputs=StructuredOutputsParams(choice=["ab", "cd"]),
            )
            stream = await engine.add_requests([([5, 6], None), ([7], None)], params, ["x", "y"])
            finals = [output async for _, output in stream if output.finished]
            completions = [c for o in finals for c in o.outputs]
            assert len(completions) == 4
            assert all(c.text in ("ab", "cd") and c.finish_reason == "stop" for c in completions)
            # once per call (not per prompt, not per sequence), in neither the loop's thread nor the engine's
            assert len(threads) == 1
            assert threads[0] is not threading.main_thread() and threads[0].name != "ernie-serve-engine"

            bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
            with pytest.raises(GrammarCompileError, match="structured_outputs.regex cannot be compiled"):
                await engine.add_requests([([5], None)], bad, ["z"])
            assert not engine._streams
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
