"""`ernie-serve bench soak`: streaming clients with random aborts for a fixed time, and whether the server
came out of it whole.

`concurrency` clients each send one random streaming completion after another (`workload.random_requests`,
the body of `bench serve`) until the time is up; a random `abort_fraction` of the streams is closed by the
client after a random number of chunks, as a user who closes the tab. Meanwhile the server process's RSS
(`/proc/<pid>/status` VmRSS) and its `/metrics` gauges are sampled at a fixed interval. When the time is up no
new request starts, the streams in flight run to their end, and `/metrics` is polled until the server is idle
(no request running or waiting, KV usage 0) or a deadline passes.

A request is *done* when its stream ended with `[DONE]`, *aborted* when the client closed it on purpose, and
*failed* otherwise: a status other than 200, an error event in the stream, a stream that ended without
`[DONE]`, or a transport error (including a read timeout). The acceptance checks, which make the command exit
non-zero so CI can run it as is: no failed request, RSS growth below `max_rss_growth_pct` from the first sample
after the warm-up to the last sample under load, and KV usage back to 0 once idle.

The warm-up is a time (`warmup_minutes`) or a number of finished requests (`warmup_requests`). A server's
memory warms up with the requests it serves, not with time: the CPU backend's kernels are built once per step
shape, and the shapes come with requests. On a busy machine a time covers too few requests to judge growth by,
so a count is the measure to prefer. With a count, the RSS check also needs the run after the warm-up to
serve at least as many requests again (growth over N requests after N); a run too short for that fails the
check rather than skip it.

The server is either started by the command (`--model`: `ernie-serve serve` in a subprocess on a free port,
stopped with SIGTERM at the end) or already running (`--base-url`, with `--server-pid` for RSS).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ernie_serve.bench.serve import _request_body
from ernie_serve.bench.stats import latency_ms, percentile
from ernie_serve.bench.workload import random_requests
from ernie_serve.core.errors import UserError
from ernie_serve.gateway.sse import DONE_DATA, SSEDecoder
from ernie_serve.logging import progress

METRIC_PREFIX = "ernie_serve:"
SERVER_START_TIMEOUT = 300.0  # seconds; loading a large checkpoint on a busy machine is slow


class SoakError(UserError):
    """The soak could not run: the server did not start, or its URL or pid is wrong."""


@dataclass
class SoakConfig:
    """What one soak run does; every field is a `bench soak` flag."""

    minutes: float = 30.0
    concurrency: int = 32
    abort_fraction: float = 0.1
    warmup_minutes: float | None = None  # None: 20% of the run, at most 5 minutes (unless warmup_requests)
    warmup_requests: int | None = None  # the warm-up ends once this many requests finished, at any time
    sample_interval: float | None = None  # seconds; None: the run split into about 60 samples, 1..30 s
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5
    vocab_size: int = 1000
    seed: int = 0
    timeout: float = 120.0  # seconds to connect or to wait for more of a response
    idle_timeout: float = 60.0  # seconds to wait for the server to be idle after the last stream
    max_rss_growth_pct: float = 10.0
    api_key: str | None = None
    endpoint: str = "/v1/completions"

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError("--minutes must be positive")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if not 0 <= self.abort_fraction <= 1:
            raise ValueError("--abort-fraction must be in [0, 1]")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--random-input-len and --random-output-len must be at least 1")
        if self.warmup_minutes is not None and not 0 <= self.warmup_minutes < self.minutes:
            raise ValueError("--warmup-minutes must be in [0, --minutes)")
        if self.warmup_requests is not None and self.warmup_minutes is not None:
            raise ValueError("--warmup-minutes and --warmup-requests cannot be used together")
        if self.warmup_requests is not None and self.warmup_requests < 0:
            raise ValueError("--warmup-requests must be at least 0")
        if self.sample_interval is not None and self.sample_interval <= 0:
            raise ValueError("--sample-interval must be positive")
        # checked here rather than at the first request, so a bad flag is one line before anything starts
        random_requests(1, self.input_len, self.output_len, self.range_ratio, self.vocab_size, self.seed)

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup_s(self) -> float:
        """The time warm-up in seconds (0 when it is counted in requests)."""
        if self.warmup_requests is not None:
            return 0.0
        if self.warmup_minutes is not None:
            return self.warmup_minutes * 60
        return min(0.2 * self.duration_s, 300.0)

    @property
    def interval_s(self) -> float:
        if self.sample_interval is not None:
            return self.sample_interval
        return min(max(self.duration_s / 60, 1.0), 30.0)


@dataclass
class StreamResult:
    """One streamed request: how it ended ("done", "aborted", "failed") and its timings."""

    prompt_len: int
    outcome: str = "failed"
    output_tokens: int = 0
    chunks: int = 0
    ttft: float = 0.0  # seconds to the first text
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Sample:
    """The server at one moment: seconds since the start, RSS in MiB (None: not measured), /metrics gauges,
    and how many requests had finished (any outcome) by then."""

    t: float
    rss_mib: float | None
    kv_cache_usage: float | None
    running: float | None
    waiting: float | None
    requests_finished: int = 0


class _StreamFailure(Exception):
    """The server's answer was not a complete stream (the message says what)."""


# ----- the server -----


def read_rss_mib(pid: int) -> float | None:
    """The process's resident set size in MiB, from /proc (Linux); None when it is gone or there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """The soak's view of `/metrics`: the scheduler gauges, and finished requests by reason as
    `request_success:<reason>` (summed over models)."""
    values: dict[str, float] = {}
    # by sample name, not family: the parser files `_total` samples under a family of their own when the
    # exposition has no HELP line, so the family name is not reliable
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(METRIC_PREFIX)
            if name == "request_success_total":
                key = f"request_success:{sample.labels.get('finished_reason', '')}"
                values[key] = values.get(key, 0.0) + sample.value
            elif name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"):
                values[name] = values.get(name, 0.0) + sample.value
    return values


async def _scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    try:
        response = await client.get(base_url + "/metrics")
        if response.status_code == 200:
            return parse_metrics(response.text)
    except (httpx.HTTPError, ValueError):
        pass  # a missed sample is shown as None, not a failed run: the streams decide that
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def started_server(
    model: str, server_args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ernie-serve serve --model MODEL` on a free local port, its output in `log_path` (environment `env`, or
    ours); yields the base URL and the process once `/health` answers 200, and stops it with SIGTERM (the
    graceful drain) at the end. Also the benchmark tests' server."""
    port = _free_port()
    cmd = [sys.executable, "-m", "ernie_serve.cli", "serve", "--model", model, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *server_args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SoakError(f"the server did not become ready in {SERVER_START_TIMEOUT:.0f} s (log: {log_path})")
            try:  # the pause between polls is a wait for the server to die, which ends it at once
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise SoakError(f"the server exited with {proc.returncode}: {tail[0]} (log: {log_path})")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----- the clients -----


async def _one_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int, abort_after: int | None
) -> StreamResult:
    """Stream one completion; with `abort_after`, close it once that many chunks have arrived (if it has not
    ended by then). Failures are recorded, not raised, so the run goes on."""
    result = StreamResult(prompt_len=prompt_len)
    decoder = SSEDecoder()
    start = last = time.perf_counter()
    finished = False
    try:
        # leaving this block with the body unread closes the connection: the server sees the client go
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise _StreamFailure(f"HTTP {response.status_code}: {text[:200]}")
            async for piece in response.aiter_text():
                now = time.perf_counter()
                for data in decoder.feed(piece):
                    if finished:
                        raise _StreamFailure("data after [DONE]")
                    if data == DONE_DATA:
                        finished = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _StreamFailure(f"error event: {chunk['error'].get('message', chunk['error'])}")
                    if chunk.get("usage"):
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("text"):
                        result.chunks += 1
                        if result.ttft == 0.0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                if abort_after is not None and not finished and result.chunks >= abort_after:
                    result.outcome = "aborted"
                    result.latency = time.perf_counter() - start
                    return result
        if not finished:
            raise _StreamFailure("the stream ended without [DONE]")
        result.outcome = "done"
        result.latency = time.perf_counter() - start
    except (httpx.HTTPError, _StreamFailure, ValueError) as exc:  # ValueError: a chunk that is not JSON
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _client_loop(
    worker: int,
    client: httpx.AsyncClient,
    url: str,
    config: SoakConfig,
    stop_at: float,
    results: list[StreamResult],
) -> None:
    """One client: request after request until `stop_at` (perf_counter time), each random, some aborted."""
    rng = random.Random(f"{config.seed}-{worker}")  # each client its own reproducible sequence
    while time.perf_counter() < stop_at:
        request = random_requests(
            1, config.input_len, config.output_len, config.range_ratio, config.vocab_size, rng.getrandbits(32)
        )[0]
        abort_after = None
        if rng.random() < config.abort_fraction:
            # within the stream's first half, so the request is still running in the engine when it goes
            abort_after = rng.randint(1, max(1, request.output_len // 2))
        # ignore_eos: every request runs to its length, so the load and the abort points are as drawn
        body = _request_body(request, None, ignore_eos=True)
        results.append(await _one_stream(client, url, body, len(request.prompt_token_ids), abort_after))


async def _sampler(
    client: httpx.AsyncClient,
    base_url: str,
    pid: int | None,
    start: float,
    stop_at: float,
    interval: float,
    samples: list[Sample],
    results: list[StreamResult],
) -> None:
    """RSS and gauges every `interval` seconds until `stop_at`, ticking the progress bar once a second;
    `results` is the clients' list of finished requests, counted at each sample."""
    ticks = progress(range(int(stop_at - start) + 1), "soak", total=int(stop_at - start) + 1, unit="s")
    next_sample = start
    while True:
        now = time.perf_counter()
        if now >= next_sample:
            metrics = await _scrape(client, base_url) or {}
            samples.append(
                Sample(
                    t=round(time.perf_counter() - start, 2),
                    rss_mib=read_rss_mib(pid) if pid is not None else None,
                    kv_cache_usage=metrics.get("kv_cache_usage_perc"),
                    running=metrics.get("num_requests_running"),
                    waiting=metrics.get("num_requests_waiting"),
                    requests_finished=len(results),
                )
            )
            next_sample += interval
        next(ticks, None)
        if time.perf_counter() >= stop_at:
            for _ in ticks:  # close the bar
                pass
            return
        await asyncio.sleep(min(1.0, max(0.0, stop_at - time.perf_counter())))


async def _wait_idle(client: httpx.AsyncClient, base_url: str, timeout: float) -> tuple[dict[str, float], float]:
    """Poll `/metrics` until nothing runs or waits and KV usage is 0, or `timeout` seconds pass; returns the
    last reading and the seconds it took."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    while True:
        metrics = await _scrape(client, base_url) or metrics
        idle = (
            metrics.get("num_requests_running") == 0
            and metrics.get("num_requests_waiting") == 0
            and metrics.get("kv_cache_usage_perc") == 0
        )
        if idle or time.perf_counter() - start > timeout:
            return metrics, time.perf_counter() - start
        await asyncio.sleep(0.2)


async def run_soak(base_url: str, pid: int | None, config: SoakConfig) -> dict[str, Any]:
    """Drive the server at `base_url` as the module docstring says; returns the report (see `summarize`)."""
    base_url = base_url.rstrip("/")
    headers = {"Accept": "text/event-stream"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(config.timeout)
    results: list[StreamResult] = []
    samples: list[Sample] = []
    async with (
        httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client,
        httpx.AsyncClient(headers=headers, timeout=timeout) as probe,  # its own pool: never queued behind streams
    ):
        before = await _scrape(probe, base_url)
        if before is None:
            raise SoakError(f"no /metrics at {base_url}: is an ernie-serve server running there?")
        start = time.perf_counter()
        stop_at = start + config.duration_s
        url = base_url + config.endpoint
        clients = [
            asyncio.create_task(_client_loop(i, client, url, config, stop_at, results))
            for i in range(config.concurrency)
        ]
        try:
            await _sampler(probe, base_url, pid, start, stop_at, config.interval_s, samples, results)
            await asyncio.gather(*clients)  # the streams in flight run to their end
        finally:  # Ctrl-C or an error: leave no request running
            for task in clients:
                task.cancel()
        drained = time.perf_counter()
        idle, idle_wait = await _wait_idle(probe, base_url, config.idle_timeout)
        rss_idle = read_rss_mib(pid) if pid is not None else None
    return summarize(
        config,
        results,
        samples,
        duration=drained - start,
        metrics_before=before,
        metrics_after=idle,
        idle_wait_s=idle_wait,
        rss_idle_mib=rss_idle,
    )


# ----- the report -----


def _latencies(seconds: Sequence[float]) -> dict[str, float]:
    stats = latency_ms(seconds)
    ms = [s * 1000 for s in seconds]
    stats["p90"] = percentile(ms, 90)
    stats["max"] = max(ms) if ms else 0.0
    return stats


def summarize(
    config: SoakConfig,
    results: Sequence[StreamResult],
    samples: Sequence[Sample],
    *,
    duration: float,
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
    idle_wait_s: float,
    rss_idle_mib: float | None,
) -> dict[str, Any]:
    """Counts, throughput, latencies, the RSS series and the acceptance checks of one run."""
    done = [r for r in results if r.outcome == "done"]
    aborted = [r for r in results if r.outcome == "aborted"]
    failed = [r for r in results if r.outcome == "failed"]
    output_tokens = sum(r.output_tokens for r in done)

    # RSS growth is measured under load on both ends (first sample after the warm-up, last before the clients
    # stopped), so it compares like with like; the memory the server builds up while warming up (kernels per
    # step shape, see the module docstring) is excluded on purpose.
    measured = [s for s in samples if s.rss_mib is not None]
    after_warmup = [
        s
        for s in measured
        if s.t >= config.warmup_s and (config.warmup_requests is None or s.requests_finished >= config.warmup_requests)
    ]
    rss: dict[str, Any] = {"measured": bool(measured)}
    if measured and not after_warmup:
        rss["error"] = "the warm-up never ended: no RSS sample after it"
    elif after_warmup and config.warmup_requests is not None:
        window = after_warmup[-1].requests_finished - after_warmup[0].requests_finished
        if window < max(config.warmup_requests, 1):
            rss["error"] = (
                f"too short after the warm-up: {window} requests finished, fewer than the warm-up's "
                f"{config.warmup_requests}"
            )
    if after_warmup:
        first, last = after_warmup[0].rss_mib, after_warmup[-1].rss_mib
        peak = max(s.rss_mib for s in after_warmup)  # type: ignore[type-var]
        assert first is not None and last is not None
        rss.update(
            start_mib=measured[0].rss_mib,
            warmup_end_s=after_warmup[0].t,
            warmup_end_requests=after_warmup[0].requests_finished,
            window_requests=after_warmup[-1].requests_finished - after_warmup[0].requests_finished,
            first_after_warmup_mib=first,
            max_mib=peak,
            last_mib=last,
            idle_mib=rss_idle_mib,
            growth_pct=(last - first) / first * 100,
            max_growth_pct=(peak - first) / first * 100,
        )
    server_finished = {
        key.split(":", 1)[1]: metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0)
        for key in sorted(set(metrics_after) | set(metrics_before))
        if key.startswith("request_success:")
    }
    kv_end = metrics_after.get("kv_cache_usage_perc")
    checks = {
        "no_failures": not failed,
        # None (not measured: no pid) does not fail the run; a warm-up that never ended does
        "rss_growth_ok": (rss["growth_pct"] < config.max_rss_growth_pct and "error" not in rss)
        if "growth_pct" in rss
        else (False if measured else None),
        "kv_back_to_zero": kv_end == 0,
        "idle_at_end": metrics_after.get("num_requests_running") == 0
        and metrics_after.get("num_requests_waiting") == 0,
    }
    config_doc = asdict(config)
    config_doc.pop("api_key")
    config_doc.update(warmup_s=config.warmup_s, sample_interval_s=config.interval_s)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_doc,
        "requests": {"total": len(results), "done": len(done), "aborted": len(aborted), "failed": len(failed)},
        "errors": sorted({r.error for r in failed})[:10],
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_output_tokens": output_tokens,
        "ttft_ms": _latencies([r.ttft for r in done]),
        "itl_ms": _latencies([v for r in done for v in r.itl]),
        "e2el_ms": _latencies([r.latency for r in done]),
        "rss": rss,
        "rss_samples": [asdict(s) for s in samples],
        "server_finished": server_finished,
        "end": {
            "kv_cache_usage_perc": kv_end,
            "num_requests_running": metrics_after.get("num_requests_running"),
            "num_requests_waiting": metrics_after.get("num_requests_waiting"),
            "idle_wait_s": idle_wait_s,
        },
        "checks": checks,
        # a check that could not be measured (no --server-pid: no RSS) does not fail the run
        "passed": all(v is not False for v in checks.values()),
    }


def format_report(summary: dict[str, Any]) -> str:
    """The human-readable report (the JSON has everything, including every sample)."""
    width = 60
    lines = [f"{' Soak Result ':=^{width}}"]

    def row(label: str, value: Any) -> None:
        text = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<44}{text:>16}")

    req = summary["requests"]
    row("Duration (s):", summary["duration_s"])
    row("Requests done:", req["done"])
    row("Requests aborted by the client:", req["aborted"])
    row("Requests failed:", req["failed"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        lines.append(f"{' ' + name + ' (ms, done requests) ':-^{width}}")
        stats = summary[key]
        row("mean / median:", f"{stats['mean']:.1f} / {stats['median']:.1f}")
        row("p90 / p99 / max:", f"{stats['p90']:.1f} / {stats['p99']:.1f} / {stats['max']:.1f}")
    lines.append(f"{' Server RSS (MiB) ':-^{width}}")
    rss = summary["rss"]
    if "growth_pct" in rss:
        row("at start:", rss["start_mib"])
        row("warm-up ended at (s / requests):", f"{rss['warmup_end_s']:.0f} / {rss['warmup_end_requests']}")
        row("first after warm-up:", rss["first_after_warmup_mib"])
        row("max after warm-up:", rss["max_mib"])
        row("last under load:", rss["last_mib"])
        row("idle at the end:", rss["idle_mib"])
        row("requests after warm-up:", rss["window_requests"])
        row("growth after warm-up (%):", rss["growth_pct"])
        if "error" in rss:
            lines.append(rss["error"])
    elif "error" in rss:
        lines.append(rss["error"])
    else:
        lines.append("not measured (no server pid)")
    lines.append(f"{' At the end ':-^{width}}")
    end = summary["end"]
    row("KV cache usage:", end["kv_cache_usage_perc"])
    row("Requests running / waiting:", f"{end['num_requests_running']} / {end['num_requests_waiting']}")
    row("Seconds until idle:", end["idle_wait_s"])
    finished = ", ".join(f"{k} {v:.0f}" for k, v in summary["server_finished"].items())
    lines.append(f"server-side finishes: {finished or 'n/a'}")
    lines.append("=" * width)
    for name, ok in summary["checks"].items():
        lines.append(f"{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'}  {name}")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def _run(
    config: SoakConfig,
    model: str | None,
    server_args: Sequence[str],
    base_url: str,
    server_pid: int | None,
    server_log: str | None,
) -> dict[str, Any]:
    """The soak against the server it starts (`model`) or the one at `base_url`; returns the report."""
    if model is not None:
        log_path = Path(server_log) if server_log else Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        with started_server(model, server_args, log_path) as (url, proc):
            summary = asyncio.run(run_soak(url, proc.pid, config))
        summary["server"] = {"started": True, "log": str(log_path), "exit_code": proc.returncode}
    else:
        if server_pid is not None and not os.path.exists(f"/proc/{server_pid}"):
            raise SoakError(f"no process {server_pid} (--server-pid)")
        summary = asyncio.run(run_soak(base_url, server_pid, config))
        summary["server"] = {"started": False, "base_url": base_url, "pid": server_pid}
    return summary


def main(
    config: SoakConfig,
    *,
    model: str | None,
    server_args: Sequence[str],
    base_url: str,
    server_pid: int | None,
    output_json: str | None,
    server_log: str | None,
) -> int:
    """Run the soak (starting the server when `model` is given), print the report, write the JSON; returns 0
    when every acceptance check passed, 1 otherwise."""
    # httpx logs every request at INFO: tens of thousands of lines would bury the report
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # a SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the server this command started is stopped too
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = _run(config, model, server_args, base_url, server_pid, server_log)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(format_report(summary) + "\n")
    if output_json:
        path = Path(output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        sys.stdout.write(f"results written to {path}\n")
    return 0 if summary["passed"] else 1
