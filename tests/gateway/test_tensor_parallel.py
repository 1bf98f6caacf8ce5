"""A server with `--tensor-parallel-size 2` (two processes over gloo on 127.0.0.1), spoken to with the official
`openai` client: the same answers as the one-process server; and a rank that dies or hangs mid-request makes
the server fail its requests, name the rank, and exit non-zero."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
PROMPTS = ["Hello", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8 9"]


def _client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _answers(server: Any) -> dict[str, Any]:
    """Greedy chat and completion answers with logprobs, streamed and not."""
    client = _client(server)
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=HELLO, max_tokens=12, temperature=0, logprobs=True
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    completions = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=PROMPTS,
        max_tokens=10,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    streamed = client.completions.create(
        model=client.models.list().data[0].id, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True
    )
    return {
        "chat": chat.choices[0].message.content,
        "chat_logprobs": [e.logprob for e in content or []],
        "texts": [c.text for c in completions.choices],
        "logprobs": [c.logprobs.token_logprobs for c in completions.choices],  # type: ignore[union-attr]
        "streamed": "".join(c.choices[0].text for c in streamed),
    }


@pytest.fixture(scope="module", params=[[], ["--enable-expert-parallel"]], ids=["tp", "tp-ep"])
def parallel_server(request, launch: Callable[..., Any], checkpoint: Path) -> Iterator[Any]:
    server = launch(checkpoint, "--served-model-name", "ernie-tiny", "--tensor-parallel-size", "2", *request.param)
    yield server
    assert server.stop() == 0


def test_two_ranks_answer_like_one_through_the_openai_client(server: Any, parallel_server: Any) -> None:
    layout = parallel_server.wait_for_event(event="tensor-parallel layout")
    assert layout["ranks"] == 2 and layout["devices"] == ["cpu", "cpu"]
    ours, theirs = _answers(parallel_server), _answers(server)
    for key in ("chat", "texts", "streamed"):
        assert ours[key] == theirs[key]
    assert ours["chat_logprobs"] == pytest.approx(theirs["chat_logprobs"], abs=1e-4)
    for mine, reference in zip(ours["logprobs"], theirs["logprobs"], strict=True):
        assert mine == pytest.approx(reference, abs=1e-4)


def _stream_until_first_token(base_url: str, received: threading.Event, events: list[str]) -> None:
    """A long streamed completion; `received` is set once its first token has arrived."""
    body = {"prompt": "Hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                received.set()
    received.set()  # also when it ended without a token, so the test fails instead of waiting


@pytest.mark.parametrize(
    ("sig", "reason", "flags"),
    [
        (signal.SIGKILL, "killed by SIGKILL", []),
        (signal.SIGSTOP, "stopped answering", ["--engine-step-timeout", "10"]),
    ],
    ids=["killed", "hung"],
)
def test_a_rank_that_dies_or_hangs_mid_request_stops_the_server(
    launch: Callable[..., Any], checkpoint: Path, sig: signal.Signals, reason: str, flags: list[str]
) -> None:
    server = launch(checkpoint, "--tensor-parallel-size", "2", "--shutdown-timeout", "5", *flags)
    worker = int(server.wait_for_event(event="tensor-parallel layout")["worker_pids"]["1"])
    received, events = threading.Event(), []
    client = threading.Thread(target=_stream_until_first_token, args=(server.base_url, received, events))
    client.start()
    try:
        assert received.wait(60) and events and events[0] != "[DONE]", events
        os.kill(worker, sig)  # mid-request: the stream has sent a token and asked for 2000
        failed = server.wait_for_event(event="a tensor-parallel step failed")
        assert failed["reason"].startswith("tensor-parallel rank 1") and reason in failed["reason"], failed
        try:
            health = httpx.get(f"{server.base_url}/health", timeout=10)
            assert health.status_code == 503, health.text
        except httpx.TransportError:
            pass  # it may already have exited: the exit status below is the proof then
        assert server.wait_exit() == 1
        client.join(60)
        assert events[-1] == "[DONE]" and "the engine stopped" in events[-2], events[-3:]
    finally:
        server.stop()
        if sig == signal.SIGSTOP:  # a stopped process cannot notice that rank 0 is gone (if rank 0 left it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_a_rank_that_dies_while_idle_turns_the_server_unhealthy_and_stops_it(
    launch: Callable[..., Any], checkpoint: Path
) -> None:
    server = launch(checkpoint, "--tensor-parallel-size", "2", "--shutdown-timeout", "5")
    worker = int(server.wait_for_event(event="tensor-parallel layout")["worker_pids"]["1"])
    try:
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        os.kill(worker, signal.SIGKILL)  # no request in flight: no step will notice
        failed = server.wait_for_event(event="the backend can no longer serve")
        assert failed["error"].startswith("tensor-parallel rank 1") and "killed by SIGKILL" in failed["error"]
        assert server.wait_exit() == 1
    finally:
        server.stop()
