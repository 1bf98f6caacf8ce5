"""Prometheus metrics: names with the `ernie_serve:` prefix, per-app registries, engine gauges at scrape."""

from __future__ import annotations

import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx

from ernie_serve.async_engine import EngineSnapshot
from ernie_serve.core.scheduler import SchedulerStats
from ernie_serve.gateway.metrics import GatewayMetrics

HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
)
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
COUNTERS = (
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "num_preemptions_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
)


def fake_engine(**stats: Any) -> Any:
    return SimpleNamespace(snapshot=EngineSnapshot(scheduler=SchedulerStats(**stats)), weight_bytes={})


def test_weight_bytes_by_kind_once_loaded(metric: Callable[..., float]) -> None:
    engine = fake_engine()
    metrics = GatewayMetrics(engine, "m")
    assert "ernie_serve:weight_bytes" not in metrics.render().decode()  # still loading
    engine.weight_bytes = {"quantized": 3000, "full_precision": 500}  # AsyncEngine's, once loaded
    text = metrics.render().decode()
    assert metric(text, "ernie_serve:weight_bytes", model_name="m", kind="quantized") == 3000
    assert metric(text, "ernie_serve:weight_bytes", model_name="m", kind="full_precision") == 500


def test_engine_state_is_read_at_scrape_time(metric: Callable[..., float]) -> None:
    engine = fake_engine()
    metrics = GatewayMetrics(engine, "m")
    assert metric(metrics.render().decode(), "ernie_serve:num_requests_running", model_name="m") == 0
    engine.snapshot = EngineSnapshot(
        scheduler=SchedulerStats(
            num_running=3,
            num_waiting=2,
            kv_cache_usage=0.25,
            prefix_cache_queries=40,
            prefix_cache_hits=10,
            num_preemptions=1,
        )
    )
    text = metrics.render().decode()
    assert metric(text, "ernie_serve:num_requests_running") == 3
    assert metric(text, "ernie_serve:num_requests_waiting") == 2
    assert metric(text, "ernie_serve:kv_cache_usage_perc") == 0.25
    assert metric(text, "ernie_serve:prefix_cache_queries_total") == 40
    assert metric(text, "ernie_serve:prefix_cache_hits_total") == 10
    assert metric(text, "ernie_serve:num_preemptions_total") == 1


def test_request_tracking_and_separate_registries(metric: Callable[..., float]) -> None:
    first, second = GatewayMetrics(fake_engine(), "a"), GatewayMetrics(fake_engine(), "b")
    tracker = first.track()
    times = {"arrival_time": 10.0, "first_token_time": 10.25}
    tracker.output({**times, "last_token_time": 10.25})  # the first token: TTFT from the engine's times
    tracker.output({**times, "last_token_time": 10.75})  # the next one, 0.5 s later
    tracker.output({**times, "last_token_time": 10.75})  # no new token time: no gap to observe
    assert tracker.finish("stop", 5, 2, {**times, "e2e_latency": 1.5, "queue_time": 0.125}) == 1.5
    tracker.finish("stop", 5, 2, None)  # a second finish is ignored
    first.track().finish("abort", 3, 0, None)  # never reached the engine: timed by the gateway's own clock
    text = first.render().decode()
    assert metric(text, "ernie_serve:request_success_total", finished_reason="stop") == 1
    assert metric(text, "ernie_serve:request_success_total", finished_reason="abort") == 1
    assert metric(text, "ernie_serve:request_success_total", finished_reason="length") == 0
    assert metric(text, "ernie_serve:prompt_tokens_total") == 8
    assert metric(text, "ernie_serve:generation_tokens_total") == 2
    assert metric(text, "ernie_serve:time_to_first_token_seconds_count") == 1
    assert metric(text, "ernie_serve:time_to_first_token_seconds_sum") == 0.25
    assert metric(text, "ernie_serve:inter_token_latency_seconds_count") == 1
    assert metric(text, "ernie_serve:inter_token_latency_seconds_sum") == 0.5
    assert metric(text, "ernie_serve:e2e_request_latency_seconds_count") == 2
    assert metric(text, "ernie_serve:e2e_request_latency_seconds_sum") >= 1.5
    assert metric(text, "ernie_serve:request_queue_time_seconds_count") == 1
    assert metric(text, "ernie_serve:request_queue_time_seconds_sum") == 0.125
    assert metric(second.render().decode(), "ernie_serve:prompt_tokens_total") == 0


def test_server_exposes_every_metric(server: Any, metric: Callable[..., float]) -> None:
    before = server.metrics()
    body = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    done = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in HISTOGRAMS:
        assert f"# TYPE ernie_serve:{name} histogram" in text.splitlines()
    for name in GAUGES:
        assert f"# TYPE ernie_serve:{name} gauge" in text.splitlines()
        assert metric(text, f"ernie_serve:{name}", model_name="ernie-tiny") == 0  # nothing runs now
    for name in COUNTERS:
        assert re.search(rf"^# TYPE ernie_serve:{name.removesuffix('_total')}(_total)? counter$", text, re.M)

    def grew(name: str, **labels: str) -> float:
        return metric(text, name, model_name="ernie-tiny", **labels) - metric(before, name, **labels)

    # exactly what this one request added: 3 tokens, each after the first one step later
    assert grew("ernie_serve:request_success_total", finished_reason="length") == 1
    assert grew("ernie_serve:prompt_tokens_total") == done["usage"]["prompt_tokens"]
    assert grew("ernie_serve:generation_tokens_total") == 3
    assert grew("ernie_serve:e2e_request_latency_seconds_count") == 1
    assert grew("ernie_serve:time_to_first_token_seconds_count") == 1
    assert grew("ernie_serve:inter_token_latency_seconds_count") == 2
    assert grew("ernie_serve:request_queue_time_seconds_count") == 1
