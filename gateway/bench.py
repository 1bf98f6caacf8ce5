"""`ernie-serve bench serve`: a serving benchmark shaped like vLLM's `vllm bench serve`.

Random prompts (token ids, so input lengths are exact) go to `/v1/completions` as streams, at most
`max_concurrency` at a time; the report gives request and token throughput and TTFT, TPOT and ITL (mean,
median, p99). `--offline` runs the same requests through the in-process engine, for the gateway's overhead.

The HTTP client is a few lines of asyncio over h11 (a dependency of uvicorn): light enough that on a small
machine the client does not steal the CPU it is measuring, and with nothing to install.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import statistics
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11

from ernie_serve.bench.workload import BenchRequest
from ernie_serve.gateway.sse import DONE_DATA, SSEDecoder

# Token ids below this are ERNIE's special tokens (<unk>, <s>, </s>, <|begin_of_sentence|>, ...).
FIRST_ORDINARY_TOKEN = 10


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first generated text
    latency: float = 0.0  # seconds to the last byte
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks
    error: str = ""


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    vocab_size: int = 1000,
    seed: int = 0,
) -> list[BenchRequest]:
    """vLLM's random dataset: lengths uniform in [len * (1 - ratio), len * (1 + ratio)], random token ids
    in [FIRST_ORDINARY_TOKEN, vocab_size). The same arguments give the same requests."""
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if vocab_size <= FIRST_ORDINARY_TOKEN:
        raise ValueError(f"--random-vocab-size must be larger than {FIRST_ORDINARY_TOKEN}")
    rng = random.Random(seed)

    def length(center: int) -> int:
        low, high = max(1, int(center * (1 - range_ratio))), max(1, int(center * (1 + range_ratio)))
        return rng.randint(low, high)

    requests = []
    for _ in range(num_prompts):
        n_in, n_out = length(input_len), length(output_len)
        requests.append(BenchRequest([rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(n_in)], n_out))
    return requests


def write_word_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """A benchmark tokenizer in which every id is a word (`w123`), so every generated token is streamed text.

    Random-weight models pick ids all over their vocabulary; with the 2048-piece demo tokenizer most of a
    32000-id model's tokens decode to nothing, no chunk is sent for them, and the HTTP path looks cheaper than
    it is with a real model. ERNIE's special tokens keep their ids 0..9; `tokenizer_config.json` is written
    too (special tokens, chat template)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from ernie_serve.demo_tokenizer import DEMO_SPECIAL_TOKENS, build_demo_tokenizer

    out = Path(out_dir)
    build_demo_tokenizer(out)  # for tokenizer_config.json; tokenizer.json is replaced below
    vocab = {token: i for i, token in enumerate(DEMO_SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DEMO_SPECIAL_TOKENS])
    tokenizer.save(str(out / "tokenizer.json"))


# ----- a minimal streaming HTTP client -----


class HTTPError(Exception):
    pass


async def post_stream(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> AsyncIterator[bytes]:
    """POST `body` as JSON and yield the response body as it arrives; HTTPError for a non-200 status."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ssl.create_default_context() if secure else None), timeout
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        payload = json.dumps(body).encode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request_headers = [
            ("Host", parts.netloc),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Accept", "text/event-stream"),
            ("Connection", "close"),
            *headers.items(),
        ]
        writer.write(conn.send(h11.Request(method="POST", target=target, headers=request_headers)))
        writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status = 0
        error_body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), timeout))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if status == 200:
                    yield bytes(event.data)
                else:
                    error_body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise HTTPError(f"HTTP {status}: {error_body.decode(errors='replace')[:300]}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def _one_request(
    url: str, model: str | None, request: BenchRequest, ignore_eos: bool, headers: dict[str, str], timeout: float
) -> RequestResult:
    body: dict[str, Any] = {
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if model:
        body["model"] = model
    result = RequestResult(prompt_len=len(request.prompt_token_ids))
    decoder = SSEDecoder()
    start = last = time.perf_counter()
    try:
        async for raw in post_stream(url, body, headers, timeout):
            now = time.perf_counter()
            for data in decoder.feed(raw):
                if data == DONE_DATA:
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise HTTPError(chunk["error"].get("message", "error in stream"))
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.success = True
    except (OSError, HTTPError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_http(
    base_url: str,
    requests: Sequence[BenchRequest],
    *,
    model: str | None = None,
    endpoint: str = "/v1/completions",
    max_concurrency: int | None = None,
    request_rate: float = math.inf,
    ignore_eos: bool = False,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results (in request order) and the wall time in seconds."""
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    rng = random.Random(seed)

    async def limited(request: BenchRequest) -> RequestResult:
        async with limit:
            return await _one_request(url, model, request, ignore_eos, headers, timeout)

    start = time.perf_counter()
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(limited(request)))
        if math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals, as vLLM's benchmark
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def run_offline(
    settings: Any, requests: Sequence[BenchRequest], *, max_concurrency: int | None = None, ignore_eos: bool = False
) -> tuple[list[RequestResult], float]:
    """The same requests through the in-process engine (no HTTP), keeping at most `max_concurrency` in flight
    as the HTTP benchmark does. Times are measured per engine step; returns results and wall time."""
    from ernie_serve.core.sampling_params import SamplingParams
    from ernie_serve.engine import Engine

    engine = Engine(settings)
    try:
        limit = max_concurrency or len(requests) or 1
        pending = list(enumerate(requests))[::-1]
        results = [RequestResult(prompt_len=len(r.prompt_token_ids)) for r in requests]
        active: dict[str, tuple[int, float, float, int]] = {}  # id -> (index, start, last, tokens)
        start = time.perf_counter()
        while pending or active:
            while pending and len(active) < limit:
                index, request = pending.pop()
                params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=ignore_eos)
                rid = engine.add_request(request.prompt_token_ids, params)
                now = time.perf_counter()
                active[rid] = (index, now, now, 0)
            outputs = engine.step()
            now = time.perf_counter()
            for output in outputs:
                if output.request_id not in active:
                    continue
                index, began, last, seen = active[output.request_id]
                tokens = len(output.outputs[0].token_ids)
                result = results[index]
                if tokens > seen:
                    if seen == 0:
                        result.ttft = now - began
                    else:
                        result.itl.append(now - last)
                    last = now
                active[output.request_id] = (index, began, last, tokens)
                if output.finished:
                    result.output_tokens = tokens
                    result.latency = now - began
                    result.success = True
                    del active[output.request_id]
        return results, time.perf_counter() - start
    finally:
        engine.close()


# ----- the report -----


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "mean": statistics.fmean(ms) if ms else 0.0,
        "median": statistics.median(ms) if ms else 0.0,
        "p99": _percentile(ms, 99),
    }


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([v for r in ok for v in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }


def format_report(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:>10}")

    row("Successful requests:", summary["completed"])
    if summary["failed"]:
        row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for key, name, long_name in (
        ("ttft_ms", "TTFT", "Time to First Token"),
        ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "ITL", "Inter-token Latency"),
    ):
        lines.append(f"{long_name:-^{width}}")
        row(f"Mean {name} (ms):", summary[key]["mean"])
        row(f"Median {name} (ms):", summary[key]["median"])
        row(f"P99 {name} (ms):", summary[key]["p99"])
    lines.append("=" * width)
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def result_document(
    summary: dict[str, Any], config: dict[str, Any], results: Sequence[RequestResult]
) -> dict[str, Any]:
    """What `--save-result` writes: the configuration, the summary, and every request's timings."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        **summary,
        "requests": [asdict(r) for r in results],
    }
