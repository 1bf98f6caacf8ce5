"""The gateway's side of the one output path: streamed stop strings that span tokens, finish reasons, and
requests the engine must refuse with a 400 naming the field (never a dead engine)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from ernie_serve.testing.stops import spanning_stop

MODEL = "ernie-tiny"
GREEDY: dict[str, Any] = {"model": MODEL, "prompt": "Hello there", "temperature": 0}


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(client: openai.OpenAI, tokenizer):
    """A greedy completion's text and token ids, and a stop string spanning two of its tokens."""
    free = client.completions.create(**GREEDY, max_tokens=24, logprobs=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    return text, spanning_stop(tokenizer, ids, from_token=3)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completion_stop_spanning_tokens(client: openai.OpenAI, reference, stream: bool) -> None:
    text, span = reference
    extra = {"ignore_eos": True}
    response = client.completions.create(**GREEDY, max_tokens=24, stop=[span.stop], stream=stream, extra_body=extra)
    if stream:
        chunks = list(response)
        sent = "".join(c.choices[0].text for c in chunks)
        last = chunks[-1].choices[0]
    else:
        sent, last = response.choices[0].text, response.choices[0]
    assert sent == text[: span.start]
    assert (last.finish_reason, last.stop_reason) == ("stop", span.stop)  # type: ignore[union-attr]


def test_chat_stream_stop_spanning_tokens(client: openai.OpenAI, tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me something."}]
    common: dict[str, Any] = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24}
    full = client.chat.completions.create(**common, extra_body={"ignore_eos": True}).choices[0].message.content
    assert full
    span = spanning_stop(tokenizer, tokenizer.encode(full), from_token=3)
    chunks = list(
        client.chat.completions.create(**common, stop=[span.stop], stream=True, extra_body={"ignore_eos": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[: span.start]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_out_of_vocabulary_stop_token_is_a_400_and_the_engine_lives(server: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 1}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "stop_token_ids": [-5000]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stop_token_ids"
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    ok = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_prompt_in_a_later_position_is_a_400_naming_it(server: Any) -> None:
    body = {"model": MODEL, "prompt": [[1, 2], [99999999]], "max_tokens": 4}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt[1]" and error["message"].startswith("prompt 1:")


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"prompt_logprobs": 1}, "prompt_logprobs"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed")],
)
def test_refused_parameters_name_themselves(server: Any, extra: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **extra}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_largest_seed_with_n(client: openai.OpenAI) -> None:
    extra = {"ignore_eos": True}
    one = client.completions.create(
        **{**GREEDY, "temperature": 1.0}, max_tokens=3, n=2, seed=2**64 - 1, extra_body=extra
    )
    two = client.completions.create(
        **{**GREEDY, "temperature": 1.0}, max_tokens=3, n=2, seed=2**64 - 1, extra_body=extra
    )
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert [c.finish_reason for c in one.choices] == ["length", "length"]
