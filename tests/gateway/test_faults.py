"""The fault drill: a server whose backend fails one step keeps serving; one whose step hangs, or whose
device breaks, turns unhealthy, fails its requests and exits non-zero so that a supervisor restarts it.

The faulty backends live in tests/faults: a plugin found through its entry point only when that folder is on
the server's PYTHONPATH. A request triggers the fault with `FAULT_TOKEN` in its own prompt; it strikes when the
request computes its third token, after a stream has sent the first ones."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

FAULTS = Path(__file__).resolve().parent.parent / "faults"
FAULT_TOKEN = 571  # tests/faults/fault_backends.py


def _start(launch: Callable[..., Any], environment: Callable[..., dict[str, str]], checkpoint: Path, *flags: str):
    return launch(checkpoint, *flags, env=environment(PYTHONPATH=str(FAULTS)))


def _completion(base_url: str, prompt: list[int], stream: bool = False, max_tokens: int = 4) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)


def _sse_events(response: httpx.Response) -> list[Any]:
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in data]


def test_a_failing_step_fails_its_request_and_the_server_goes_on(
    launch: Callable[..., Any], environment: Callable[..., dict[str, str]], checkpoint: Path, metric: Any
) -> None:
    server = _start(launch, environment, checkpoint, "--backend", "raising")
    try:
        failed = _completion(server.base_url, [5, FAULT_TOKEN, 6])
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"]["code"] == "internal_error"
        assert failed.json()["error"]["type"] == "server_error"

        streamed = _completion(server.base_url, [7, FAULT_TOKEN], stream=True)
        events = _sse_events(streamed)
        assert streamed.status_code == 200 and events[0]["choices"][0]["text"], events  # a token went out first
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500, events

        # the engine serves on, and the faulty requests were not retried: one failed step each
        ok = _completion(server.base_url, [5, 6, 7])
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
        assert len(server.events(event="engine step failed; its requests end with an error")) == 2
        errors = metric(server.metrics(), "ernie_serve:request_success_total", finished_reason="error")
        assert errors == 2
    finally:
        assert server.stop() == 0


def test_a_hung_step_makes_the_server_exit_non_zero(
    launch: Callable[..., Any], environment: Callable[..., dict[str, str]], checkpoint: Path
) -> None:
    server = _start(
        launch, environment, checkpoint, "--backend", "hanging", "--engine-step-timeout", "2", "--shutdown-timeout", "5"
    )
    responses: list[httpx.Response] = []
    client = threading.Thread(target=lambda: responses.append(_completion(server.base_url, [5, FAULT_TOKEN], True)))
    client.start()
    try:
        server.wait_for_event(event="an engine step is hung")
        server.wait_for_event(event="the engine stopped; the server shuts down")
        assert server.wait_exit() == 1
        client.join(60)
        events = _sse_events(responses[0])
        assert events[-1] == "[DONE]" and events[-2]["error"]["message"].startswith("the engine stopped"), events
    finally:
        server.stop()


def test_a_broken_device_makes_the_server_exit_non_zero(
    launch: Callable[..., Any], environment: Callable[..., dict[str, str]], checkpoint: Path
) -> None:
    server = _start(launch, environment, checkpoint, "--backend", "broken-device", "--shutdown-timeout", "5")
    try:
        failed = _completion(server.base_url, [5, FAULT_TOKEN])
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "not_ready"
        assert server.wait_exit() == 1
        crash = server.events(event="engine loop crashed")
        assert len(crash) == 1 and "the device is gone" in crash[0]["exception"][0]["exc_value"], crash
    finally:
        server.stop()


def test_a_step_out_of_memory_is_retried_smaller_and_only_an_irreducible_one_fails(
    launch: Callable[..., Any],
    environment: Callable[..., dict[str, str]],
    checkpoint: Path,
    metric: Any,
    server: Any,
) -> None:
    """The out-of-memory backend has room for 8 tokens a step. A 20-token prompt, and four requests decoding
    together, make larger steps: each runs out of memory, its requests are preempted and recomputed in
    smaller steps, and every request still gets the same greedy tokens as on the plain torch backend. A
    request holding the fault token runs out of memory even alone with one token: only it fails."""
    oom = _start(launch, environment, checkpoint, "--backend", "out-of-memory")
    try:
        long_prompt = list(range(5, 25))
        prompts = [long_prompt, [5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: _completion(oom.base_url, p, max_tokens=6), prompts))
            reference = list(pool.map(lambda p: _completion(server.base_url, p, max_tokens=6), prompts))
        assert [a.status_code for a in answers] == [200] * len(prompts), [a.text for a in answers]
        assert [a.json()["choices"][0]["text"] for a in answers] == [r.json()["choices"][0]["text"] for r in reference]
        retries = metric(oom.metrics(), "ernie_serve:num_oom_retries_total")
        assert retries >= 1
        logged = "out of memory in a step: its requests are preempted, smaller steps follow"
        oom.wait_for_event(event=logged)
        assert len(oom.events(event=logged)) == retries

        failed = _completion(oom.base_url, [5, FAULT_TOKEN, 6])
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error", failed.text
        ok = _completion(oom.base_url, [5, 6, 7], max_tokens=6)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]
        assert httpx.get(f"{oom.base_url}/health").json() == {"status": "ok"}
    finally:
        assert oom.stop() == 0
