"""API keys (flags and environment), X-Request-Id, and the concurrency limit."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
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
def keyed(checkpoint: Path, launch: Callable[..., Any]) -> Iterator[Any]:
    server = launch(checkpoint, "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-concurrency", "2", wait=False)
    try:
        server.wait_ready()  # /health needs no key
        yield server
    finally:
        server.stop()


MISSING = "missing API key: send it as 'Authorization: Bearer KEY'"
INCORRECT = "incorrect API key provided"


def _auth_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


def test_every_route_but_health_needs_a_key(keyed: Any, checkpoint: Path) -> None:
    base = keyed.base_url
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{base}{path}", json={})
        assert (response.status_code, response.json()) == (401, _auth_error(MISSING)), path
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, f"{base}{path}", json={}, headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()) == (401, _auth_error(INCORRECT)), path
    for key in KEYS:
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [str(checkpoint)]
    assert httpx.get(f"{base}/metrics", headers={"x-api-key": KEYS[1]}).status_code == 200


def test_openai_client_with_and_without_the_key(keyed: Any, checkpoint: Path) -> None:
    good = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEYS[0], max_retries=0)
    response = good.completions.create(
        model=str(checkpoint), prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert [c.finish_reason for c in response.choices] == ["length"]
    assert response.usage is not None and response.usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.body == _auth_error(INCORRECT)["error"]


def test_request_id_is_echoed_even_on_401(keyed: Any) -> None:
    response = httpx.get(f"{keyed.base_url}/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "abc-123"
    odd = httpx.get(f"{keyed.base_url}/health", headers={"X-Request-Id": "has spaces\tand tabs"})
    assert re.fullmatch("[0-9a-f]{32}", odd.headers["x-request-id"])  # not echoed: a fresh id instead


def test_requests_beyond_max_concurrency_get_429(keyed: Any) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{keyed.base_url}/v1/completions"
    ids = ["slot-0", "slot-1"]
    with ExitStack() as stack:
        readers = []  # keep the iterators: dropping one closes its response, which aborts the request
        for rid in ids:
            response = stack.enter_context(
                httpx.stream("POST", url, json=body, headers={**headers, "X-Request-Id": rid}, timeout=60)
            )
            assert response.status_code == 200
            readers.append(response.iter_bytes())
            next(readers[-1])
        third = httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=headers, timeout=60)
        assert third.status_code == 429
        assert third.json()["error"] == {
            "message": "too many concurrent requests: this server takes 2 at a time; retry later",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEYS[0], max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    # the two streams were dropped: once the gateway has ended both calls, their slots are free
    for rid in ids:
        assert keyed.wait_for_event(event="request finished", request_id=rid)["finish_reason"] == "abort"
    fourth = httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=headers, timeout=60)
    assert fourth.status_code == 200, fourth.text


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
