"""Hostile input through a real server: every malformed, absurd or out-of-range request is a 4xx in OpenAI's
error shape (never a 5xx or a traceback), and the server serves a normal request right after it.

Each case is sent as raw bytes, so the test controls exactly what reaches the server (invalid UTF-8, NaN
literals, chunked bodies), which the `openai` client would refuse to produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

MODEL = "ernie-tiny"
HI = [{"role": "user", "content": "hi"}]
CHAT: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 2}
COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
BIG = 10**30  # far beyond 64 bits
DEEP = 100_000


def _chat(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def _completion(**fields: Any) -> bytes:
    return json.dumps({**COMPLETION, **fields}).encode()


def _raw_chat(extra: str) -> bytes:
    """A chat body with `extra` spliced in verbatim (for literals json.dumps will not write)."""
    return (
        b'{"model":"'
        + MODEL.encode()
        + b'","messages":[{"role":"user","content":"hi"}],"max_tokens":2,'
        + (extra.encode() + b"}")
    )


CHAT_URL = "/v1/chat/completions"
COMPLETION_URL = "/v1/completions"


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx whose body is exactly OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    assert isinstance(error["type"], str)
    return error


def assert_still_serves(http: httpx.Client) -> None:
    """/health is 200 and a normal chat completion succeeds."""
    assert http.get("/health").status_code == 200
    response = http.post(CHAT_URL, json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def post(http: httpx.Client, url: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return http.post(url, content=body, headers={"content-type": content_type})


# (id, url, body, the expected param or None when the error names no field)
CASES: list[tuple[str, str, bytes, str | None]] = [
    # NaN, Infinity and values beyond float range, in every bounded float
    *[
        (f"{literal}-{field}", CHAT_URL, _raw_chat(f'"{field}":{literal}'), field)
        for field in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
        for literal in ("NaN", "Infinity", "-Infinity", "1e999")
    ],
    # integers beyond 64 bits wherever an integer goes
    *[
        (f"huge-{field}", CHAT_URL, _chat(**{field: BIG}), field)
        for field in ("max_tokens", "max_completion_tokens", "n", "min_tokens", "seed")
    ],
    ("huge-logprobs", COMPLETION_URL, _completion(logprobs=BIG), "logprobs"),
    ("huge-top_logprobs", CHAT_URL, _chat(logprobs=True, top_logprobs=BIG), "top_logprobs"),
    ("huge-negative-top_k", CHAT_URL, _chat(top_k=-BIG), "top_k"),
    # token ids outside the vocabulary in every field that takes them
    ("prompt-id-huge", COMPLETION_URL, _completion(prompt=[BIG]), "prompt"),
    ("prompt-id-negative", COMPLETION_URL, _completion(prompt=[1, -1]), "prompt"),
    ("prompt-id-past-vocab", COMPLETION_URL, _completion(prompt=[[1], [10**9]]), "prompt[1]"),
    ("stop_token_ids-huge", CHAT_URL, _chat(stop_token_ids=[BIG]), "stop_token_ids"),
    ("stop_token_ids-negative", CHAT_URL, _chat(stop_token_ids=[-1], min_tokens=1), "stop_token_ids"),
    ("stop_token_ids-past-vocab", COMPLETION_URL, _completion(stop_token_ids=[10**9]), "stop_token_ids"),
    ("logit_bias-huge-key", CHAT_URL, _chat(logit_bias={str(BIG): 1}), "logit_bias"),
    ("logit_bias-negative-key", CHAT_URL, _chat(logit_bias={"-5": 1}), "logit_bias"),
    ("logit_bias-nan-value", CHAT_URL, _raw_chat('"logit_bias":{"1":NaN}'), "logit_bias"),
    # nesting
    ("deep-prompt", COMPLETION_URL, b'{"prompt":' + b"[" * DEEP + b"]" * DEEP + b"}", None),
    ("deep-content", CHAT_URL, b'{"messages":[{"role":"user","content":' + b"[" * DEEP + b"]" * DEEP + b"}]}", None),
    ("deep-object", CHAT_URL, _raw_chat('"user":' + '{"a":' * DEEP + "1" + "}" * DEEP), None),
    ("nested-prompt-3", COMPLETION_URL, _completion(prompt=[[[1, 2]]]), "prompt"),
    ("content-object", CHAT_URL, _chat(messages=[{"role": "user", "content": {"text": "hi"}}]), None),
    # text encodings
    ("invalid-utf8", CHAT_URL, b'{"messages":[{"role":"user","content":"\xff\xfe\xc3"}],"max_tokens":2}', None),
    ("invalid-utf8-key", CHAT_URL, _raw_chat('"\xff":1').replace(b"\xc3\xbf", b"\xff"), None),
    ("lone-surrogate-content", CHAT_URL, _raw_chat('"stop":"a"').replace(b'"hi"', b'"\\ud800"'), None),
    ("lone-surrogate-prompt", COMPLETION_URL, b'{"prompt":"\\udfff","max_tokens":2}', None),
    ("lone-surrogate-stop", CHAT_URL, _raw_chat('"stop":["\\ud83d"]'), None),
    ("lone-surrogate-model", CHAT_URL, _raw_chat('"user":"x"').replace(MODEL.encode(), b"\\udc00"), None),
    ("nul-bytes", CHAT_URL, b'{"messages":[{"role":"user","content":"hi"}],\x00"max_tokens":2}', None),
    # not a JSON object
    ("empty-body", CHAT_URL, b"", None),
    ("json-array", CHAT_URL, b"[]", None),
    ("json-string", CHAT_URL, b'"hi"', None),
    ("json-null", COMPLETION_URL, b"null", None),
    ("truncated", CHAT_URL, _chat()[:-3], None),
    ("trailing-garbage", CHAT_URL, _chat() + b"}}", None),
    # wrong types and shapes
    ("model-number", CHAT_URL, _chat(model=7), "model"),
    ("unknown-model-surrogate-pair", CHAT_URL, _chat(model="\U0001f600"), "model"),
    ("stream-string", CHAT_URL, _chat(stream="yes"), "stream"),
    ("stream_options-list", CHAT_URL, _chat(stream=True, stream_options=[]), "stream_options"),
    ("messages-empty", CHAT_URL, _chat(messages=[]), "messages"),
    ("role-null", CHAT_URL, _chat(messages=[{"role": None, "content": "hi"}]), "messages.0.role"),
    ("response_format-number", CHAT_URL, _chat(response_format=5), "response_format"),
    ("best_of-huge", COMPLETION_URL, _completion(best_of=BIG), "best_of"),
    ("stop-not-strings", CHAT_URL, _chat(stop=[1, 2]), "stop"),
    ("stop-empty-string", CHAT_URL, _chat(stop=[""]), "stop"),
]


@pytest.mark.parametrize(("url", "body", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_body_is_a_4xx_in_openai_shape(http: httpx.Client, url: str, body: bytes, param: str | None) -> None:
    error = assert_openai_error(post(http, url, body))
    if param is not None:
        assert error["param"] == param, error
    assert_still_serves(http)


@pytest.mark.parametrize(
    "fields",
    [{"top_k": BIG}, {"priority": BIG}, {"priority": -BIG}, {"stop": ["x"] * 256}],
    ids=["top_k-huge", "priority-huge", "priority-huge-negative", "stop-256"],
)
def test_extreme_values_that_still_mean_something_are_served(http: httpx.Client, fields: dict[str, Any]) -> None:
    """A top_k past the vocabulary is no top-k; any integer orders requests; 256 stops is the most allowed."""
    response = post(http, CHAT_URL, _chat(**fields))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", ""],
)
def test_wrong_content_type(http: httpx.Client, content_type: str) -> None:
    """The body is read as JSON whatever the header says (`curl -d` sends form-urlencoded by default, as
    many clients do), so a JSON body is served; a body that is not JSON is a 400."""
    ok = post(http, CHAT_URL, _chat(), content_type)
    assert ok.status_code == 200, ok.text
    form = post(http, CHAT_URL, b"model=ernie-tiny&prompt=hi", content_type)
    assert_openai_error(form, 400)
    xml = post(http, COMPLETION_URL, b"<prompt>hi</prompt>", content_type)
    assert_openai_error(xml, 400)
    assert_still_serves(http)


def test_stop_strings_by_the_hundred_thousand(http: httpx.Client) -> None:
    """100,000 stop strings (about 1 MB, under the body limit) are refused with a 400 naming `stop`: each
    would be checked against the text after every token."""
    stops = [f"never-{i:06d}" for i in range(100_000)]
    error = assert_openai_error(post(http, CHAT_URL, _chat(stop=stops)), 400)
    assert error["param"] == "stop"
    error = assert_openai_error(post(http, COMPLETION_URL, _completion(stop=stops)), 400)
    assert error["param"] == "stop"
    assert_still_serves(http)


def test_a_surrogate_pair_is_text_not_an_error(http: httpx.Client) -> None:
    """The JSON escape of a character outside the BMP is two surrogates that make one character: valid."""
    body = _raw_chat('"user":"x"').replace(b'"hi"', b'"\\ud83d\\ude00 hi"')
    response = post(http, CHAT_URL, body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_a_405_in_openai_shape(http: httpx.Client, method: str) -> None:
    assert_openai_error(http.request(method, CHAT_URL), 405)
    assert_still_serves(http)


def test_unknown_route_is_a_404_in_openai_shape(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/\ud7ff-nothing", content=b"{}"), 404)
    assert_still_serves(http)
