"""`ernie-serve bench soak` for two minutes against a server it starts on the tiny checkpoint: the CI form of
the reliability soak (docs/reliability.md). The run time is fixed; the assertions are the command's own
acceptance checks, read from its JSON, never speeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ernie_serve.bench.soak import Sample, SoakConfig, StreamResult, format_report, parse_metrics, summarize
from ernie_serve.cli import main

SOAK_MINUTES = "2"  # the CI run; the first minute is the warm-up


def test_parse_metrics_reads_gauges_and_finishes() -> None:
    text = (
        'ernie_serve:kv_cache_usage_perc{model_name="m"} 0.25\n'
        'ernie_serve:num_requests_running{model_name="m"} 3.0\n'
        "# TYPE ernie_serve:request_success counter\n"
        'ernie_serve:request_success_total{model_name="m",finished_reason="abort"} 2.0\n'
        'ernie_serve:request_success_created{model_name="m",finished_reason="abort"} 1.7e9\n'
    )
    assert parse_metrics(text) == {
        "kv_cache_usage_perc": 0.25,
        "num_requests_running": 3.0,
        "request_success:abort": 2.0,
    }


def test_summary_checks_and_report() -> None:
    config = SoakConfig(minutes=1, warmup_minutes=0.5)
    results = [
        StreamResult(prompt_len=4, outcome="done", output_tokens=3, ttft=0.1, latency=0.3, itl=[0.1, 0.1]),
        StreamResult(prompt_len=4, outcome="aborted", chunks=1, ttft=0.1),
        StreamResult(prompt_len=4, error="_StreamFailure: the stream ended without [DONE]"),
    ]
    samples = [Sample(t, rss, 0.0, 0.0, 0.0) for t, rss in ((0.0, 50.0), (30.0, 100.0), (45.0, 130.0), (59.0, 105.0))]
    after = {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}
    summary = summarize(
        config, results, samples, duration=2.0, metrics_before={}, metrics_after=after, idle_wait_s=0.1,
        rss_idle_mib=104.0,
    )  # fmt: skip
    assert summary["requests"] == {"total": 3, "done": 1, "aborted": 1, "failed": 1}
    # growth from the first sample at or after the warm-up (30 s) to the last under load; the peak apart
    assert summary["rss"]["growth_pct"] == pytest.approx(5.0)
    assert summary["rss"]["max_growth_pct"] == pytest.approx(30.0)
    assert summary["checks"] == {
        "no_failures": False,
        "rss_growth_ok": True,
        "kv_back_to_zero": True,
        "idle_at_end": True,
    }
    assert summary["passed"] is False
    assert summary["e2el_ms"]["median"] == pytest.approx(300.0)
    report = format_report(summary)
    assert "FAIL  no_failures" in report and "PASS  kv_back_to_zero" in report
    assert "error: _StreamFailure: the stream ended without [DONE]" in report


def _rss_check(config: SoakConfig, samples: list[Sample]) -> tuple[dict, bool | None]:
    after = {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}
    summary = summarize(
        config, [], samples, duration=1.0, metrics_before={}, metrics_after=after, idle_wait_s=0.0, rss_idle_mib=None
    )
    return summary["rss"], summary["checks"]["rss_growth_ok"]


def test_warmup_counted_in_requests() -> None:
    config = SoakConfig(minutes=1, warmup_requests=10)
    assert config.warmup_s == 0.0
    # (t, rss, requests finished): the warm-up ends at the first sample with 10 done, whatever its time
    points = ((0.0, 50.0, 0), (5.0, 90.0, 4), (10.0, 100.0, 12), (20.0, 104.0, 20), (30.0, 108.0, 25))
    samples = [Sample(t, rss, 0.0, 0.0, 0.0, n) for t, rss, n in points]
    rss, ok = _rss_check(config, samples)
    assert (rss["warmup_end_s"], rss["warmup_end_requests"], rss["window_requests"]) == (10.0, 12, 13)
    assert rss["growth_pct"] == pytest.approx(8.0) and ok is True
    # the same growth over fewer requests after the warm-up than in it fails, rather than pass on too little
    rss, ok = _rss_check(config, samples[:-1])
    assert rss["window_requests"] == 8 and ok is False and "too short" in rss["error"]
    # a warm-up that never ended fails too; no RSS at all (no pid) is not measured
    rss, ok = _rss_check(config, samples[:2])
    assert ok is False and "never ended" in rss["error"]
    _, ok = _rss_check(config, [Sample(0.0, None, 0.0, 0.0, 0.0, 30)])
    assert ok is None


def test_soak_two_minutes(
    bench_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("ERNIE_SERVE_") and n != "ERNIE_SERVE_CACHE"]:
        monkeypatch.delenv(name)  # the started server must not pick up the developer's settings
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model gains nothing from more; the clients share 2 cores
    out = tmp_path / "soak.json"
    # A small KV pool: the CPU default is sized for 64 requests of the full context and is touched lazily, so
    # under a soak RSS would keep growing until every block had been used once; 256 blocks (8 clients need at
    # most 40) are all touched within the warm-up and what is left is the server's own growth. The warm-up is
    # the first minute, a time rather than a request count so the test's length does not depend on the machine:
    # oneDNN caches a CPU kernel per step shape (up to 1,024), so RSS grows as the first requests bring new
    # shapes, fast and then slower (docs/reliability.md, "Soak").
    code = main(
        ["bench", "soak", "--model", str(bench_model), "--minutes", SOAK_MINUTES, "--concurrency", "8",
         "--abort-fraction", "0.1", "--random-input-len", "24", "--random-output-len", "16",
         "--random-vocab-size", "400", "--warmup-minutes", "1", "--server-arg=--num-gpu-blocks-override=256",
         "--output-json", str(out), "--server-log", str(tmp_path / "server.log")]
    )  # fmt: skip
    report = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert code == 0, report
    requests = summary["requests"]
    assert requests["failed"] == 0, summary["errors"]
    assert requests["aborted"] > 0 and requests["done"] > requests["aborted"]
    assert requests["total"] == requests["done"] + requests["aborted"]
    # the server finished every request once; a client that closes a stream whose last tokens are already
    # on the way finds it finished as "length", so the server counts at most as many aborts as the clients
    finished = summary["server_finished"]
    assert finished["abort"] + finished["length"] + finished.get("stop", 0) == requests["total"]
    assert 0 < finished["abort"] <= requests["aborted"]
    assert summary["rss"]["growth_pct"] < 10.0
    assert summary["end"]["kv_cache_usage_perc"] == 0
    assert summary["end"]["num_requests_running"] == 0 and summary["end"]["num_requests_waiting"] == 0
    assert summary["checks"] == dict.fromkeys(("no_failures", "rss_growth_ok", "kv_back_to_zero", "idle_at_end"), True)
    assert summary["server"]["exit_code"] == 0  # SIGTERM at the end drained and exited cleanly
    assert "PASS  no_failures" in report


def test_bad_flags_are_one_line_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "soak", "--model", "unused", "--abort-fraction", "2"]) == 2
    assert capsys.readouterr().err.strip() == "ernie-serve: error: --abort-fraction must be in [0, 1]"
    assert main(["bench", "soak", "--model", "unused", "--minutes", "1", "--warmup-minutes", "1"]) == 2
    assert "--warmup-minutes" in capsys.readouterr().err
    assert main(["bench", "soak", "--model", "unused", "--warmup-minutes", "1", "--warmup-requests", "5"]) == 2
    assert "cannot be used together" in capsys.readouterr().err
