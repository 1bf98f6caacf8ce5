"""Prometheus metrics, named as vLLM and FastDeploy name them with an `ernie_serve:` prefix.

Each app owns a `CollectorRegistry` (several apps can live in one test process). Per-request latencies come
from the engine's own timestamps on its outputs (`RequestOutput.metrics`), observed by `RequestTracker` as
they arrive; scheduler gauges and counters are read from the engine's snapshot at scrape time, so they cost
nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ernie_serve.async_engine import AsyncEngine

PREFIX = "ernie_serve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)  # fmt: skip


class _EngineCollector(Collector):
    """Scheduler state from the engine's last snapshot, read at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.snapshot.scheduler
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("num_requests_running", "Sequences holding KV blocks and scheduled every step.", stats.num_running)
        yield gauge("num_requests_waiting", "Sequences queued or preempted, waiting to run.", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage)
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted to free KV blocks.", stats.num_preemptions)
        yield counter(
            "num_oom_retries",
            "Steps that ran out of device memory; their requests were preempted and smaller steps followed.",
            stats.num_oom_retries,
        )
        weight_bytes = self.engine.weight_bytes  # empty until the model has loaded
        if weight_bytes:
            family = GaugeMetricFamily(
                PREFIX + "weight_bytes",
                "Resident model weight bytes by kind: quantized, full_precision, kernel_copies (prepacked).",
                labels=["model_name", "kind"],
            )
            for kind, size in weight_bytes.items():
                family.add_metric([self.model_name, kind], size)
            yield family


class GatewayMetrics:
    """The app's metrics; `track()` one `RequestTracker` per generation request."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["model_name"]

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, documentation, labels, registry=r, buckets=buckets).labels(model_name)

        def counter(name: str, documentation: str) -> Any:
            return Counter(PREFIX + name, documentation, labels, registry=r).labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Seconds from request arrival to the first generated token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Seconds between two successive outputs of one request.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Seconds from request arrival to its last token.", E2E_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Seconds a request waited in the engine before it was first scheduled.",
            TTFT_BUCKETS,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason (abort: the client left or the server shut down).",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success_family = success
        r.register(_EngineCollector(engine, model_name))

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def finished(self, reason: str) -> None:
        counter = self.success.get(reason)
        if counter is None:  # e.g. "error": counted, though not pre-declared
            counter = self.success[reason] = self._success_family.labels(self.model_name, reason)
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency bookkeeping of one API call. The times come from the engine's outputs (`RequestOutput.metrics`),
    the one source of request timings; the gateway only observes them."""

    __slots__ = ("metrics", "started", "ttft", "last_token_time", "done")

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.started = time.monotonic()  # for calls that end before the engine reports anything
        self.ttft: float | None = None
        self.last_token_time: float | None = None
        self.done = False

    def output(self, engine_metrics: dict[str, float] | None) -> None:
        """Called for every engine output that carries new tokens: observes time to first token once, then
        the gap since the previous token."""
        if engine_metrics is None or "last_token_time" not in engine_metrics:
            return
        last = engine_metrics["last_token_time"]
        if self.ttft is None:
            self.ttft = engine_metrics["first_token_time"] - engine_metrics["arrival_time"]
            self.metrics.ttft.observe(self.ttft)
        elif self.last_token_time is not None and last > self.last_token_time:
            self.metrics.itl.observe(last - self.last_token_time)
        self.last_token_time = last

    def finish(
        self, reason: str, prompt_tokens: int, output_tokens: int, engine_metrics: dict[str, float] | None
    ) -> float:
        """Called once when the call ends (finished, aborted or failed); returns its duration: the engine's
        end-to-end latency, or the gateway's own clock when the engine never finished the request."""
        engine_metrics = engine_metrics or {}
        duration = engine_metrics.get("e2e_latency", time.monotonic() - self.started)
        if self.done:
            return duration
        self.done = True
        m = self.metrics
        m.e2e.observe(duration)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(output_tokens)
        m.finished(reason)
        if "queue_time" in engine_metrics:
            m.queue_time.observe(max(0.0, engine_metrics["queue_time"]))
        return duration
