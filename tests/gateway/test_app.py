"""The endpoints end to end: a real server, the official `openai` client (sync and async) and raw httpx."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable
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


def test_chat_stream_equals_non_stream_at_temperature_0(client: openai.OpenAI, tokenizer: Any) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert full.usage is not None
    # greedy, so one fixed answer: it either used all 12 tokens or ended early on the end-of-sentence token
    assert choice.message.role == "assistant"
    assert choice.finish_reason == ("length" if full.usage.completion_tokens == 12 else "stop")
    assert full.usage.completion_tokens <= 12
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
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


def test_completions_echo_batch_and_token_prompts(client: openai.OpenAI, tokenizer: Any) -> None:
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
    assert logprobs is not None
    tokens, chosen, tops = logprobs.tokens or [], logprobs.token_logprobs or [], logprobs.top_logprobs or []
    assert len(tokens) == len(chosen) == len(tops) == 4
    assert "".join(tokens) == response.choices[0].text
    for token, logprob, top in zip(tokens, chosen, tops, strict=True):
        assert logprob <= 0 and len(top) == 2  # the 2 most likely; greedy, so the chosen token is one of them
        assert top[token] == pytest.approx(logprob) == max(top.values())
    assert logprobs.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(4)]


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
        max_tokens=4,
        temperature=0,
        extra_body={"some_future_field": {"x": 1}},
        extra_headers={"X-Request-Id": "trace-42"},
    )
    assert raw.headers["x-request-id"] == "trace-42"
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    assert raw.parse().choices[0].message.content == plain.choices[0].message.content  # the field changed nothing
    generated = httpx.get(f"{server.base_url}/v1/models").headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", generated)


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


@pytest.fixture(scope="module")
def idle(metric: Callable[..., float]) -> Callable[[str], bool]:
    """`idle(metrics_text)`: no request running or waiting, and no KV block in use."""

    def check(text: str) -> bool:
        return (
            metric(text, "ernie_serve:num_requests_running") == 0
            and metric(text, "ernie_serve:num_requests_waiting") == 0
            and metric(text, "ernie_serve:kv_cache_usage_perc") == 0
        )

    return check


def _aborts(text: str, metric: Callable[..., float]) -> float:
    return metric(text, "ernie_serve:request_success_total", finished_reason="abort")


def test_disconnect_mid_stream_aborts(server: Any, metric: Callable[..., float], idle: Callable[[str], bool]) -> None:
    aborts = _aborts(server.wait_for_metrics(idle), metric)
    rid = f"leaves-mid-stream-{uuid.uuid4().hex}"
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{server.base_url}/v1/completions"
    with httpx.stream("POST", url, json=body, headers={"X-Request-Id": rid}, timeout=60) as response:
        for _ in response.iter_bytes():
            break  # got the first chunk; leave
    finished = server.wait_for_event(event="request finished", request_id=rid)
    assert finished["finish_reason"] == "abort" and 1 <= finished["output_tokens"] < 1500
    assert _aborts(server.metrics(), metric) == aborts + 1
    server.wait_for_metrics(idle)  # the engine dropped the request: its KV blocks are free again


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(
    server: Any, metric: Callable[..., float], idle: Callable[[str], bool]
) -> None:
    aborts = _aborts(server.wait_for_metrics(idle), metric)
    rid = f"leaves-while-waiting-{uuid.uuid4().hex}"
    payload = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {rid}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + payload)
        # hang up once the engine runs it, long before its 1,500 tokens are done
        server.wait_for_metrics(lambda text: metric(text, "ernie_serve:num_requests_running") == 1)
    finished = server.wait_for_event(event="request finished", request_id=rid)
    assert finished["finish_reason"] == "abort" and finished["output_tokens"] < 1500
    assert _aborts(server.metrics(), metric) == aborts + 1
    server.wait_for_metrics(idle)


def test_web_search_extension_formats_the_question(client: openai.OpenAI, tokenizer: Any) -> None:
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


class _FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 30 for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.decode_token(t) for t in token_ids)

    def decode_token(self, token_id: int) -> str:
        return chr(ord("a") + token_id % 26)


class _FakeEngine:
    """Just enough of AsyncEngine for the app, with every step in the test's hands: loading waits for
    `loaded`; each request yields one token, then holds until `finish("length")` or an abort."""

    def __init__(self) -> None:
        from ernie_serve.async_engine import EngineSnapshot
        from ernie_serve.core.config import EngineSettings

        self.settings = EngineSettings(model="fake")
        self.snapshot = EngineSnapshot()
        self.tokenizer = _FakeTokenizer()
        self.is_loading = True
        self.is_ready = False
        self.max_model_len = 64
        self.weight_bytes: dict[str, int] = {}
        self.loaded = asyncio.Event()
        self.started = asyncio.Event()  # a request's first token has gone to the gateway
        self.aborted: list[str] = []
        self._finished = asyncio.Event()
        self._reason = ""

    async def start(self) -> None:
        await self.loaded.wait()
        self.is_loading, self.is_ready = False, True

    async def shutdown(self, timeout: float = 0.0) -> None:
        self.is_ready = False

    def finish(self, reason: str) -> None:
        self._reason = reason
        self._finished.set()

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        self.finish("abort")

    async def add_requests(
        self, prompts: list[tuple[list[int], str | None]], params: Any, request_ids: list[str], priority: int = 0
    ) -> Any:
        from ernie_serve.core.request import CompletionOutput, RequestOutput

        def output(token_ids: list[int], reason: str | None) -> RequestOutput:
            text = self.tokenizer.decode(token_ids)
            choice = CompletionOutput(0, text, token_ids, None, None, finish_reason=reason)
            prompt_ids, prompt = prompts[0]
            return RequestOutput(request_ids[0], prompt, list(prompt_ids), [choice], finished=reason is not None)

        async def outputs() -> AsyncIterator[tuple[int, Any]]:
            yield 0, output([7], None)
            self.started.set()  # the gateway asks for more: the first token is out
            await self._finished.wait()
            yield 0, output([7, 8], self._reason)

        return outputs()


@pytest.fixture
def fake_app() -> Callable[[], Any]:
    """`fake_app()` -> (engine, the gateway app on it); drive the app inside `app.router.lifespan_context`."""

    def make() -> tuple[_FakeEngine, Any]:
        from ernie_serve.gateway.app import build_app

        engine = _FakeEngine()
        return engine, build_app(engine, use_plugins=False)  # type: ignore[arg-type]

    return make


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_health_is_503_while_loading_and_while_shutting_down(fake_app: Callable[[], Any]) -> None:
    async def run() -> None:
        engine, app = fake_app()
        async with app.router.lifespan_context(app), _client(app) as c:
            response = await c.get("/health")
            assert (response.status_code, response.json()) == (503, {"status": "loading"})
            busy = await c.post("/v1/completions", json={"prompt": "x"})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
            engine.loaded.set()
            await app.state.loader  # the app's loading task has seen the engine start
            assert (await c.get("/health")).json() == {"status": "ok"}
            await app.state.serving.drain(0)
            assert (await c.get("/health")).json() == {"status": "shutting down"}
            closing = await c.post("/v1/completions", json={"prompt": "x"})
            assert closing.status_code == 503 and closing.json()["error"]["code"] == "shutting_down"

    asyncio.run(run())


_HELD = {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}


def _sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = decode_stream([response.content])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_drain_lets_a_running_stream_finish_and_refuses_new_calls(
    fake_app: Callable[[], Any], metric: Callable[..., float]
) -> None:
    async def run() -> None:
        engine, app = fake_app()
        engine.loaded.set()
        async with app.router.lifespan_context(app), _client(app) as client:
            await app.state.loader
            streaming = asyncio.ensure_future(client.post("/v1/completions", json=_HELD))
            await asyncio.wait_for(engine.started.wait(), 30)
            drain = asyncio.ensure_future(app.state.serving.drain(600.0))
            # tasks start in the order they were made: the drain has begun when this request is handled
            health = await asyncio.ensure_future(client.get("/health"))
            assert (health.status_code, health.json()) == (503, {"status": "shutting down"})
            refused = await client.post("/v1/completions", json=_HELD)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert not drain.done()  # it waits for the running stream

            engine.finish("length")
            chunks = _sse_chunks(await asyncio.wait_for(streaming, 30))
            await asyncio.wait_for(drain, 30)  # and returns once it is done
            assert engine.aborted == []
            assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "hi"
            assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, "length"]
            text = app.state.metrics.render().decode()
            assert metric(text, "ernie_serve:request_success_total", finished_reason="length") == 1
            assert metric(text, "ernie_serve:request_success_total", finished_reason="abort") == 0

    asyncio.run(run())


def test_drain_aborts_what_still_runs_at_the_deadline(
    fake_app: Callable[[], Any], metric: Callable[..., float]
) -> None:
    async def run() -> None:
        engine, app = fake_app()
        engine.loaded.set()
        async with app.router.lifespan_context(app), _client(app) as client:
            await app.state.loader
            streaming = asyncio.ensure_future(client.post("/v1/completions", json=_HELD))
            await asyncio.wait_for(engine.started.wait(), 30)
            # the request never finishes by itself: only the drain's abort can end it
            await asyncio.wait_for(app.state.serving.drain(0), 30)
            chunks = _sse_chunks(await asyncio.wait_for(streaming, 30))  # the stream still ends cleanly
            assert engine.aborted == [chunks[0]["id"]]
            assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, "abort"]
            text = app.state.metrics.render().decode()
            assert metric(text, "ernie_serve:request_success_total", finished_reason="abort") == 1

    asyncio.run(run())
