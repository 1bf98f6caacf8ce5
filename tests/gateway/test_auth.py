"""API keys (flags and environment), X-Request-Id, and the concurrency limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ernie_serve.gateway.auth import APIKeyMiddleware, RequestIdMiddleware
from ernie_serve.gateway.settings import ServerSettings

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def keyed(checkpoint, launch) -> Iterator[Any]:
    server = launch(checkpoint, "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-concurrency", "2", wait=False)
    try:
        server.wait_ready()  # /health needs no key
        yield server
    finally:
        server.stop()


def test_every_route_but_health_needs_a_key(keyed: Any) -> None:
    base = keyed.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{base}{path}", json={})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "missing" in response.json()["error"]["message"]
        wrong = httpx.request(method, f"{base}{path}", json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "incorrect" in wrong.json()["error"]["message"]
    for key in KEYS:
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{base}/metrics", headers={"x-api-key": KEYS[1]}).status_code == 200


def test_openai_client_with_and_without_the_key(keyed: Any, checkpoint: Any) -> None:
    good = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEYS[0], max_retries=0)
    assert good.completions.create(model=str(checkpoint), prompt="Hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_request_id_is_echoed_even_on_401(keyed: Any) -> None:
    response = httpx.get(f"{keyed.base_url}/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "abc-123"
    odd = httpx.get(f"{keyed.base_url}/health", headers={"X-Request-Id": "has spaces\tand tabs"})
    assert odd.headers["x-request-id"] != "has spaces\tand tabs" and len(odd.headers["x-request-id"]) == 32


def test_requests_beyond_max_concurrency_get_429(keyed: Any) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{keyed.base_url}/v1/completions"
    with ExitStack() as stack:
        readers = []  # keep the iterators: dropping one closes its response, which aborts the request
        for _ in range(2):
            response = stack.enter_context(httpx.stream("POST", url, json=body, headers=headers, timeout=60))
            assert response.status_code == 200
            readers.append(response.iter_bytes())
            next(readers[-1])
        third = httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=headers, timeout=60)
        assert third.status_code == 429
        assert third.json()["error"]["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEYS[0], max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 20  # the two streams were dropped: their slots free up
    while httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=headers).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ----- settings and middleware, in-process -----


def test_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ERNIE_SERVE_API_KEY", "FD_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert ServerSettings().api_keys == []
    monkeypatch.setenv("FD_API_KEY", "fd-key")
    assert ServerSettings().api_keys == ["fd-key"]
    monkeypatch.setenv("ERNIE_SERVE_API_KEY", "a, b")
    assert ServerSettings().api_keys == ["a", "b"]  # ours wins over FastDeploy's
    assert ServerSettings(api_key=["x", "y"]).api_keys == ["x", "y"]
    monkeypatch.setenv("ERNIE_SERVE_API_KEY", "12345")
    assert ServerSettings().api_keys == ["12345"]


def test_middleware_in_process() -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse(request.state.request_id)

    app = Starlette(routes=[Route("/health", hello), Route("/x", hello)])
    wrapped = RequestIdMiddleware(APIKeyMiddleware(app, keys=["k"]))

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            response = await client.get("/x", headers={"Authorization": "Bearer k", "X-Request-Id": "r1"})
            assert response.text == "r1" and response.headers["x-request-id"] == "r1"
            assert (await client.get("/x", headers={"Authorization": "Basic k"})).status_code == 401
            assert (await client.get("/x", headers={"Authorization": "bearer k"})).status_code == 200

    asyncio.run(run())
