"""Every caller mistake is a 4xx with OpenAI's error body; nothing is a 500 or a traceback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from ernie_serve.gateway.errors import EXCEPTION_HANDLERS, APIError, error_body

MODEL = "ernie-tiny"
MESSAGES = [{"role": "user", "content": "hi"}]


def post(server: Any, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, message: str) -> dict:
    """An OpenAI error body with exactly `message` (a `message` ending in "..." is a prefix)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    if message.endswith("..."):
        assert body["error"]["message"].startswith(message[:-3]), body["error"]["message"]
    else:
        assert body["error"]["message"] == message
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"messages": MESSAGES, "max_tokens": 0},
            "max_tokens",
            "max_tokens: Input should be greater than or equal to 1",
        ),
        ({"messages": MESSAGES, "top_p": 1.5}, "top_p", "top_p: Input should be less than or equal to 1"),
        ({"messages": MESSAGES, "n": 0}, "n", "n: Input should be greater than or equal to 1"),
        ({"messages": MESSAGES, "temperature": "warm"}, "temperature", "temperature: Input should be a valid number"),
        (
            {"messages": MESSAGES, "frequency_penalty": -3},
            "frequency_penalty",
            "frequency_penalty: Input should be greater than or equal to -2",
        ),
        (
            {"messages": MESSAGES, "min_tokens": 5, "max_tokens": 2},
            "min_tokens",
            "min_tokens (5) must not exceed max_tokens (2)",
        ),
        (
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tool_choice",
            '"auto" tool choice needs a server started with --enable-auto-tool-choice and --tool-call-parser',
        ),
        (
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "tools.0.function.name: String should match pattern '^[A-Za-z0-9_-]{1,64}$'",
        ),
        (
            {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
            "response_format.json_schema.schema",
            "response_format.json_schema.schema: Input should be an object",
        ),
        (
            {"messages": [{"role": "function", "content": "x", "name": "f"}]},
            "messages.0.role",
            "messages.0.role: 'function' messages (OpenAI's deprecated functions API) are not supported: use 'tool'",
        ),
        ({"messages": []}, "messages", "messages: List should have at least 1 item after validation, not 0"),
        ({}, "messages", "'messages' is required"),
        ({"messages": "hi"}, "messages", "messages: Input should be a valid array"),
    ],
)
def test_chat_bad_requests(server: Any, body: dict, param: str, message: str) -> None:
    error = assert_error(post(server, "/v1/chat/completions", json=body), 400, param, message)
    assert (error["type"], error["code"]) == ("invalid_request_error", None)


@pytest.mark.parametrize("raw", [b'{"messages": [', b"", b"not json", b"\xff\xfe"])
def test_malformed_json_is_400(server: Any, raw: bytes) -> None:
    response = post(server, "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, None, "the request body is not valid JSON: ...")


def test_body_must_be_an_object(server: Any) -> None:
    assert_error(post(server, "/v1/completions", json=[1, 2]), 400, None, "the request body must be a JSON object")


def test_prompt_plus_max_tokens_over_the_context_names_both_lengths(server: Any) -> None:
    too_much = "this model's maximum context length is 2048 tokens, but the request asks for"
    assert_error(
        post(server, "/v1/completions", json={"prompt": [5] * 100, "max_tokens": 5000}),
        400,
        "max_tokens",
        f"{too_much} 5100 (100 in the prompt plus 5000 to generate)",
    )
    assert_error(
        post(server, "/v1/completions", json={"prompt": [5] * 2100, "max_tokens": 1}),
        400,
        "max_tokens",
        f"{too_much} 2101 (2100 in the prompt plus 1 to generate)",
    )


def test_out_of_vocabulary_token_ids(server: Any, checkpoint: Path) -> None:
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    response = post(server, "/v1/completions", json={"prompt": [vocab]})
    assert_error(response, 400, "prompt", f"prompt token ids must be in [0, {vocab})")
    assert post(server, "/v1/completions", json={"prompt": [vocab - 1], "max_tokens": 1}).status_code == 200


def test_unknown_model_is_404(server: Any) -> None:
    error = assert_error(
        post(server, "/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES}),
        404,
        "model",
        "the model 'gpt-4' does not exist",
    )
    assert (error["type"], error["code"]) == ("not_found_error", "model_not_found")


def test_unknown_route_and_wrong_method(server: Any) -> None:
    assert_error(httpx.get(f"{server.base_url}/v1/nothing"), 404, None, "no route GET /v1/nothing")
    assert_error(
        httpx.get(f"{server.base_url}/v1/chat/completions"),
        405,
        None,
        "method GET is not allowed on /v1/chat/completions",
    )


def test_openai_client_sees_typed_errors(server: Any) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)  # type: ignore[arg-type]
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="nope", prompt="x")
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=10**6)  # type: ignore[arg-type]
    assert too_long.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_unexpected_exception_is_a_500_without_a_traceback() -> None:
    asyncio.run(_unexpected_exception())


async def _unexpected_exception() -> None:
    async def boom(request: Any) -> Any:
        raise RuntimeError("secret internals at /srv/app.py line 3")

    async def teapot(request: Any) -> Any:
        raise APIError(418, "short and stout", param="x", code="teapot")

    app = Starlette(
        routes=[Route("/boom", boom), Route("/teapot", teapot)],
        exception_handlers=dict(EXCEPTION_HANDLERS),  # type: ignore[arg-type]
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
        assert response.status_code == 500
        assert response.json() == error_body("internal server error", "server_error")
        assert "secret" not in response.text
        response = await client.get("/teapot")
        assert response.status_code == 418 and response.json()["error"]["code"] == "teapot"
