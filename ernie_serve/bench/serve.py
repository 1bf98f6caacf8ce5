"""`ernie-serve bench serve`: a serving benchmark shaped like vLLM's `vllm bench serve`.

Random prompts (token ids, so input lengths are exact; `workload.random_requests`) go to `/v1/completions`
as streams, at most `max_concurrency` at a time, arriving all at once or as a Poisson process of
`request_rate` per second; the report gives request and token throughput and TTFT, TPOT and ITL (mean,
median, p99). `run_offline` runs the same requests through the in-process engine, which shows what the HTTP
layer costs.

The client is httpx's `AsyncClient` with a pool of one connection per request in flight, so connections are
reused as with vLLM's aiohttp client, and the server's SSE stream is read as text as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from ernie_serve.bench.stats import latency_ms
from ernie_serve.bench.workload import BenchRequest
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.engine import Engine
from ernie_serve.gateway.sse import DONE_DATA, SSEDecoder
from ernie_serve.logging import progress


@dataclass
class RequestResult:
    """One request's timings, as `--save-result` writes them."""

    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first generated text
    latency: float = 0.0  # seconds to the end of the response
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks
    error: str = ""


class BenchRequestError(Exception):
    """The server answered a request with an error status or an error event in the stream."""


# ----- over HTTP -----


def _request_body(request: BenchRequest, model: str | None, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        # the final chunk then carries the token count: text chunks do not say how many tokens they hold
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if model:
        body["model"] = model
    return body


async def _one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int) -> RequestResult:
    """Stream one completion; the result records failures instead of raising them, so one bad request does not
    end the run."""
    result = RequestResult(prompt_len=prompt_len)
    decoder = SSEDecoder()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise BenchRequestError(f"HTTP {response.status_code}: {text[:300]}")
            async for piece in response.aiter_text():
                now = time.perf_counter()  # every event in this piece arrived now
                for data in decoder.feed(piece):
                    if data == DONE_DATA:
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BenchRequestError(chunk["error"].get("message", "error in stream"))
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
    except (httpx.HTTPError, BenchRequestError, ValueError) as exc:  # ValueError: a chunk that is not JSON
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def arrival_times(count: int, request_rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent: all at 0 for an infinite rate, else a Poisson
    process of `request_rate` per second (exponential gaps, as vLLM's benchmark)."""
    if not (math.isfinite(request_rate) and request_rate > 0):
        return [0.0] * count
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


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
    """Send every request; returns the results (in request order) and the wall time in seconds. `timeout`
    bounds connecting and each wait for more of a response, not a whole response."""
    url = base_url.rstrip("/") + endpoint
    concurrency = max_concurrency or len(requests) or 1
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    in_flight = asyncio.Semaphore(concurrency)  # waiters are served in arrival order
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()

        async def send(request: BenchRequest, arrival: float) -> RequestResult:
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the request's arrival time in the Poisson process
            async with in_flight:
                body = _request_body(request, model, ignore_eos)
                return await _one_request(client, url, body, len(request.prompt_token_ids))

        arrivals = arrival_times(len(requests), request_rate, seed)
        tasks = [asyncio.create_task(send(r, a)) for r, a in zip(requests, arrivals, strict=True)]
        try:
            for done in progress(asyncio.as_completed(tasks), "requests", total=len(tasks), unit="req"):
                await done
        finally:  # Ctrl-C or a cancelled caller: do not leave requests running
            for task in tasks:
                task.cancel()
        duration = time.perf_counter() - start
    return [task.result() for task in tasks], duration


# ----- in process -----


def _drive_offline(
    engine: Engine,
    requests: Sequence[BenchRequest],
    results: list[RequestResult],
    limit: int,
    ignore_eos: bool,
) -> Iterator[int]:
    """Keep at most `limit` requests in the engine, step it, fill in `results`; yields the index of each request
    as it finishes. Times are per engine step: a step's tokens all arrive when it returns."""
    pending = list(enumerate(requests))[::-1]
    active: dict[str, tuple[int, float, float, int]] = {}  # request id -> (index, start, last token, tokens)
    while pending or active:
        while pending and len(active) < limit:
            index, request = pending.pop()
            params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=ignore_eos)
            request_id = engine.add_request(request.prompt_token_ids, params)
            now = time.perf_counter()
            active[request_id] = (index, now, now, 0)
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.request_id not in active:
                continue
            index, began, last, seen = active[output.request_id]
            tokens = len(output.outputs[0].token_ids)  # outputs are cumulative
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
                yield index


def run_offline(
    settings: EngineSettings,
    requests: Sequence[BenchRequest],
    *,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
) -> tuple[list[RequestResult], float]:
    """The same requests through the in-process engine (no HTTP), keeping at most `max_concurrency` in flight
    as the HTTP benchmark does; returns results and wall time (engine start-up excluded)."""
    engine = Engine(settings)
    try:
        results = [RequestResult(prompt_len=len(r.prompt_token_ids)) for r in requests]
        limit = max_concurrency or len(requests) or 1
        start = time.perf_counter()
        finished = _drive_offline(engine, requests, results, limit, ignore_eos)
        for _ in progress(finished, "requests", total=len(requests), unit="req"):
            pass
        return results, time.perf_counter() - start
    finally:
        engine.close()


# ----- the report -----


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Counts, throughputs and latency statistics of one run (what the report and the JSON show)."""
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
        "ttft_ms": latency_ms([r.ttft for r in ok]),
        "tpot_ms": latency_ms(tpots),
        "itl_ms": latency_ms([v for r in ok for v in r.itl]),
        "e2el_ms": latency_ms([r.latency for r in ok]),
    }


def format_report(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """vLLM's report layout, so the numbers can be read side by side with `vllm bench serve`'s."""
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
