"""`ernie-serve bench serve`: the statistics, and short runs of the command against a real server, the
in-process engine and nothing at all. They check what was sent and counted, never how fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ernie_serve.bench.serve import RequestResult, arrival_times, format_report, summarize
from ernie_serve.bench.stats import percentile
from ernie_serve.cli import main


def test_percentile_matches_numpy_linear() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([], 99) == 0.0


def test_arrivals_all_at_once_or_poisson() -> None:
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    poisson = arrival_times(2000, 50.0, seed=1)
    assert poisson == arrival_times(2000, 50.0, seed=1) != arrival_times(2000, 50.0, seed=2)
    assert poisson[0] == 0.0 and all(a < b for a, b in zip(poisson[:-1], poisson[1:], strict=True))
    assert poisson[-1] / (len(poisson) - 1) == pytest.approx(1 / 50.0, rel=0.1)  # mean gap 1/rate


def test_summary_and_report() -> None:
    results = [
        RequestResult(prompt_len=10, success=True, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestResult(prompt_len=10, success=True, output_tokens=3, ttft=0.2, latency=0.4, itl=[0.1, 0.1]),
        RequestResult(prompt_len=10, error="BenchRequestError: HTTP 500"),
    ]
    summary = summarize(results, duration=2.0)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (2, 1, 8)
    assert summary["output_throughput"] == 4.0 and summary["request_throughput"] == 1.0
    assert summary["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert summary["ttft_ms"]["median"] == pytest.approx(150.0)
    report = format_report(summary)
    assert re.search(r"^Output token throughput \(tok/s\): +4\.00$", report, re.M)
    assert re.search(r"^Mean TPOT \(ms\): +100\.00$", report, re.M)
    assert re.search(r"^Failed requests: +1$", report, re.M)
    assert "error: BenchRequestError: HTTP 500" in report


def test_bench_serve_against_the_server(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "serve", "--base-url", server_url, "--num-prompts", "6", "--max-concurrency", "3",
         "--random-input-len", "12", "--random-output-len", "5", "--random-vocab-size", "400", "--ignore-eos",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^Successful requests: +6$", out, re.M)
    assert re.search(r"^Total input tokens: +72$", out, re.M)
    assert re.search(r"^Total generated tokens: +30$", out, re.M)
    assert "Failed requests" not in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["total_output_tokens"] == 30 and saved["total_input_tokens"] == 72
    assert saved["config"]["max_concurrency"] == 3 and len(saved["requests"]) == 6
    assert all(r["success"] and r["output_tokens"] == 5 and r["ttft"] > 0 for r in saved["requests"])


def test_bench_serve_reports_error_statuses(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "serve", "--base-url", server_url, "--endpoint", "/v1/nope", "--num-prompts", "2",
                 "--random-input-len", "4", "--random-output-len", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^Failed requests: +2$", out, re.M)
    assert "error: BenchRequestError: HTTP 404" in out


def test_bench_offline_runs_the_same_requests(bench_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "serve", "--offline", "--model", str(bench_model), "--num-prompts", "4", "--max-concurrency", "2",
         "--random-input-len", "8", "--random-output-len", "4", "--random-vocab-size", "400", "--ignore-eos"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Offline Engine Benchmark Result" in out
    assert re.search(r"^Successful requests: +4$", out, re.M)
    assert re.search(r"^Total input tokens: +32$", out, re.M)
    assert re.search(r"^Total generated tokens: +16$", out, re.M)


def test_bench_against_nothing_reports_failures(unused_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{unused_port}", "--num-prompts", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^Failed requests: +2$", out, re.M)
    assert "error: ConnectError" in out
