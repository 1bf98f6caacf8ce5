"""Structured output end to end: the official `openai` client against a real server (random weights) with
`response_format` json_object and json_schema (outputs validated with `jsonschema`), `beta.chat.completions.parse`
with a pydantic model, vLLM's `structured_outputs` on both endpoints, streamed and not, and schemas the grammar
engine cannot compile (a 400 with its message, never a 500)."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "ernie-tiny"
ASK = [{"role": "user", "content": "Give me the answer as JSON."}]

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "kind": {"enum": ["town", "city", "village"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "population", "kind", "sunny"],
    "additionalProperties": False,
}


class Place(BaseModel):
    """What `parse` asks for: the SDK turns it into a strict json_schema response format."""

    name: str = Field(max_length=8)
    rating: int = Field(ge=1, le=5)
    kind: Literal["cafe", "park", "museum"]
    open_late: bool


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=120,
        temperature=1.0,
        seed=1,
        n=3,
        response_format=json_schema_format(SCHEMA),  # type: ignore[arg-type]
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_object_response_format_streamed_and_not(client: openai.OpenAI) -> None:
    # Any object: its strings are unbounded, and random weights end one only by chance (greedy ones never); this
    # seed ends it within max_tokens. Streamed with the same seed, the same tokens come.
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=ASK, max_tokens=120, temperature=0.8, seed=7, response_format={"type": "json_object"}
    )
    full = client.chat.completions.create(**kwargs)
    text = full.choices[0].message.content or ""
    assert full.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_beta_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=80, temperature=0.7, seed=3, response_format=Place
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Place)
    assert parsed.kind in ("cafe", "park", "museum") and 1 <= parsed.rating <= 5 and len(parsed.name) <= 8


def test_structured_outputs_on_chat_and_completions(client: openai.OpenAI) -> None:
    regex = r"[A-Z][a-z]{1,6}-[0-9]{2}"
    chat = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=30,
        temperature=1.0,
        seed=4,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    assert re.fullmatch(regex, chat.choices[0].message.content or ""), chat.choices[0].message.content
    choices = ["north", "south", "east west"]
    completion = client.completions.create(
        model=MODEL,
        prompt=["Which way?", "Where to?"],
        max_tokens=10,
        temperature=1.0,
        seed=5,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert len(completion.choices) == 2 and all(c.text in choices for c in completion.choices)
    streamed = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=120,
        temperature=0.9,
        seed=6,
        stream=True,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_guided_fields(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    )
    assert response.choices[0].message.content in ("left", "right")


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"response_format": json_schema_format({"type": "objectx"})},
            "response_format",
            "structured_outputs.json cannot be compiled: .*objectx",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "structured_outputs.regex cannot be"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs", "nowhere"),
        ({"structured_outputs": {}}, "structured_outputs", "set exactly one of json, regex, choice, grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "set exactly one of"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            None,
            "response_format and structured_outputs both constrain the output",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a 'json_schema' object"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type: Input should be"),
    ],
)
def test_bad_constraints_are_400s_with_the_reason(server: Any, body: dict, param: str | None, message: str) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]), error
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_a_bad_schema_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=4,
            response_format=json_schema_format({"type": "object", "properties": {"a": {"type": "nonsense"}}}),  # type: ignore[arg-type]
        )
    assert "nonsense" in info.value.message and info.value.body["param"] == "response_format"  # type: ignore[index]
