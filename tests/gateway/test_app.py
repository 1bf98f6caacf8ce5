"""The endpoints end to end: a real server, the official `openai` client (sync and async) and raw httpx."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from ernie_serve.gateway.sse import decode_stream
from ernie_serve.plugins.web_search import SearchReference, build_search_prompt

MODEL = "ernie-tiny"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_health_and_models(server: Any, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 2048  # type: ignore[attr-defined]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_stream_equals_non_stream_at_temperature_0(client: openai.OpenAI, tokenizer) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    assert full.usage is not None
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing(server: Any) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    events = decode_stream([raw])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert all("usage" not in c for c in chunks)  # not asked for


def test_completions_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.usage is not None and full.usage.completion_tokens == 10
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_echo_batch_and_token_prompts(client: openai.OpenAI, tokenizer) -> None:
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    ids = tokenizer.encode("Hello")
    batch = client.completions.create(model=MODEL, prompt=["Hello", "World"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == batch.choices[0].text == batch.choices[1].text
    assert echoed.choices[0].text == "Hello" + by_ids.choices[0].text
    assert batch.usage is not None and batch.usage.prompt_tokens == len(ids) + len(tokenizer.encode("World"))


def test_n_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        response = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=seed, n=2
        )
        assert [c.index for c in response.choices] == [0, 1]
        return [c.message.content or "" for c in response.choices]

    first = sample(7)
    assert sample(7) == first
    assert first[0] != first[1]  # the n completions are sampled independently
    assert sample(8) != first


def test_n_streams_every_choice(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=1.0, n=3, stream=True)
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == response.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    streamed = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    tokens = [
        e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert tokens == [e.token for e in content]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs or [])
    assert logprobs.text_offset == [sum(len(t) for t in (logprobs.tokens or [])[:i]) for i in range(4)]


def test_stop_strings_streamed_and_not(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    assert len(text) > 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    cut = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}, stop=[stop]
    )
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].stop_reason == stop  # type: ignore[attr-defined]
    streamed = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
        stop=stop,
        stream=True,
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unknown_fields_ignored_and_request_id_echoed(server: Any, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=2,
        extra_body={"some_future_field": {"x": 1}},
        extra_headers={"X-Request-Id": "trace-42"},
    )
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().choices[0].message.content is not None
    generated = httpx.get(f"{server.base_url}/v1/models").headers["x-request-id"]
    assert len(generated) == 32


def test_sixteen_concurrent_streams_each_get_their_own_tokens(server: Any) -> None:
    prompts = [f"Story number {i}: once upon a time" for i in range(16)]

    async def run() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)

        async def one(prompt: str, stream: bool) -> str:
            if not stream:
                response = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
                return response.choices[0].text
            parts = []
            async for chunk in await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
            ):
                parts.append(chunk.choices[0].text)
            return "".join(parts)

        streamed = await asyncio.gather(*(one(p, True) for p in prompts))
        single = await asyncio.gather(*(one(p, False) for p in prompts))
        await client.close()
        return list(streamed), list(single)

    streamed, single = asyncio.run(run())
    assert streamed == single
    assert len(set(streamed)) > 1  # different prompts, different continuations


def _metrics(server: Any) -> str:
    return httpx.get(f"{server.base_url}/metrics").text


@pytest.fixture(scope="module")
def abort_count(server: Any, metric):
    return lambda: metric(_metrics(server), "ernie_serve:request_success_total", finished_reason="abort")


@pytest.fixture(scope="module")
def idle(server: Any, metric):
    def check() -> bool:
        text = _metrics(server)
        return (
            metric(text, "ernie_serve:num_requests_running") == 0
            and metric(text, "ernie_serve:num_requests_waiting") == 0
            and metric(text, "ernie_serve:kv_cache_usage_perc") == 0
        )

    return check


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_disconnect_mid_stream_aborts(server: Any, abort_count, idle) -> None:
    _wait_for(idle)
    aborts = abort_count()
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as response:
        for _ in response.iter_bytes():
            break  # got the first chunk; leave
    _wait_for(lambda: abort_count() == aborts + 1)
    _wait_for(idle)  # its KV blocks are free again


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(server: Any, abort_count, idle) -> None:
    _wait_for(idle)
    aborts = abort_count()
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=1.0)
    _wait_for(lambda: abort_count() == aborts + 1)
    _wait_for(idle)


def test_web_search_extension_formats_the_question(client: openai.OpenAI, tokenizer) -> None:
    search = {
        "references": [
            {
                "title": "Jay Chou",
                "url": "baike.baidu.com",
                "site_name": "Baidu Baike",
                "publish_time": "2025-04-20",
                "content": "Jay Chou was born on 18 January 1979 in New Taipei.",
            }
        ],
        "date": "2025-04-20T14:30:00+08:00",
    }
    question = "When was Jay Chou born?"
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=2,
        extra_body={"web_search": search},
    )
    prompt = build_search_prompt(question, [SearchReference(**search["references"][0])], search["date"])
    assert "#Current Time 2025-04-20 14:30:00, Sunday, Beijing/China" in prompt
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert response.usage is not None and response.usage.prompt_tokens == len(tokenizer.encode(rendered))

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, extra_body={"web_search": {"references": "nope"}}
        )
    assert info.value.body["param"] == "web_search.references"  # type: ignore[index]


class _SlowEngine:
    """Just enough of AsyncEngine for the app: loading waits until the test lets it finish."""

    def __init__(self) -> None:
        from ernie_serve.async_engine import EngineSnapshot
        from ernie_serve.core.config import EngineSettings

        self.settings = EngineSettings(model="slow")
        self.snapshot = EngineSnapshot()
        self.is_loading = True
        self.is_ready = False
        self.max_model_len = 64
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()
        self.is_loading, self.is_ready = False, True

    async def shutdown(self, timeout: float = 0.0) -> None:
        self.is_ready = False


def test_health_is_503_while_loading_and_while_shutting_down() -> None:
    from ernie_serve.gateway.app import build_app

    async def run() -> None:
        engine = _SlowEngine()
        app = build_app(engine, use_plugins=False)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/health")
            assert (response.status_code, response.json()) == (503, {"status": "loading"})
            busy = await c.post("/v1/completions", json={"prompt": "x"})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
            engine.loaded.set()
            await asyncio.sleep(0.05)
            assert (await c.get("/health")).json() == {"status": "ok"}
            await app.state.serving.drain(0)
            assert (await c.get("/health")).json() == {"status": "shutting down"}
            closing = await c.post("/v1/completions", json={"prompt": "x"})
            assert closing.status_code == 503 and closing.json()["error"]["code"] == "shutting_down"

    asyncio.run(run())
