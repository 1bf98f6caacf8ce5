"""Backends registered only in tests (the fault drill): the torch backend, except that a request whose prompt
holds the token `FAULT_TOKEN` makes the step that computes its third generated token raise, never return, or
report a broken device, depending on the backend chosen: by then a stream has sent its first tokens.

A request carries the fault in its own prompt, so the drill also shows that only the faulty request fails.
The out-of-memory backend is a device with room for a few tokens a step (see `OutOfMemoryBackend`); the roomy
one a device with a terabyte free."""

from __future__ import annotations

import threading
from dataclasses import replace

from ernie_serve.backends.torch.backend import TorchBackend
from ernie_serve.core.errors import BackendOutOfMemoryError, EngineFatalError
from ernie_serve.core.hookspecs import hookimpl

FAULT_TOKEN = 571  # in the tiny checkpoints' vocabulary (576 ids); prompts give it as a token id


class _FaultyBackend(TorchBackend):
    def load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().load(*args, **kwargs)
        self.faulty_prompt_lengths: dict[str, int] = {}  # request id -> prompt length

    def has_fault(self, plan) -> bool:  # type: ignore[no-untyped-def]
        for item in plan.scheduled:
            if item.is_new and FAULT_TOKEN in item.token_ids:
                self.faulty_prompt_lengths[item.request_id] = len(item.token_ids)
        lengths = self.faulty_prompt_lengths
        return any(item.start_position >= lengths.get(item.request_id, 1 << 30) + 2 for item in plan.scheduled)


class RaisingBackend(_FaultyBackend):
    def execute(self, plan):  # type: ignore[no-untyped-def]
        if self.has_fault(plan):
            raise RuntimeError("injected fault: this step's plan holds the fault token")
        return super().execute(plan)


class HangingBackend(_FaultyBackend):
    never = threading.Event()

    def execute(self, plan):  # type: ignore[no-untyped-def]
        if self.has_fault(plan):
            self.never.wait()  # a hung kernel or worker
        return super().execute(plan)


class BrokenDeviceBackend(_FaultyBackend):
    def execute(self, plan):  # type: ignore[no-untyped-def]
        if self.has_fault(plan):
            raise EngineFatalError("injected fault: the device is gone")
        return super().execute(plan)


class OutOfMemoryBackend(_FaultyBackend):
    """A device with room for `ROOM_TOKENS` tokens a step: a larger step runs out of memory, as does any step
    holding a request with the fault token (no step is small enough for it)."""

    ROOM_TOKENS = 8

    def execute(self, plan):  # type: ignore[no-untyped-def]
        self.has_fault(plan)  # remembers the requests whose prompt holds the fault token
        holds_fault = any(item.request_id in self.faulty_prompt_lengths for item in plan.scheduled)
        if plan.num_tokens > self.ROOM_TOKENS or holds_fault:
            self._prepare(plan)  # the failed step has taken in its requests' block tables, as a real one may have
            raise BackendOutOfMemoryError("injected: out of memory in this step")
        return super().execute(plan)


class RoomyDeviceBackend(TorchBackend):
    """A device reporting a terabyte free after loading (no memory is taken: the engine sizes the pool from the
    report, and it is capped long before that)."""

    def kv_cache_spec(self):  # type: ignore[no-untyped-def]
        return replace(super().kv_cache_spec(), device_free_bytes=1 << 40)


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    register("raising", RaisingBackend)
    register("hanging", HangingBackend)
    register("broken-device", BrokenDeviceBackend)
    register("out-of-memory", OutOfMemoryBackend)
    register("roomy-device", RoomyDeviceBackend)
