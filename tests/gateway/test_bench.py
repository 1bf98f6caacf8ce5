"""`ernie-serve bench serve`: the workload, the statistics, and a short run against the test server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ernie_serve.cli import main
from ernie_serve.gateway.bench import (
    FIRST_ORDINARY_TOKEN,
    RequestResult,
    _percentile,
    format_report,
    random_requests,
    summarize,
)


def test_random_requests_are_reproducible_and_in_range() -> None:
    requests = random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=3)
    assert requests == random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=3)
    assert requests != random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=4)
    assert all(15 <= len(r.prompt_token_ids) <= 45 and 5 <= r.output_len <= 15 for r in requests)
    assert all(FIRST_ORDINARY_TOKEN <= t < 50 for r in requests for t in r.prompt_token_ids)
    fixed = random_requests(3, 8, 4)
    assert [len(r.prompt_token_ids) for r in fixed] == [8, 8, 8] and [r.output_len for r in fixed] == [4, 4, 4]
    with pytest.raises(ValueError):
        random_requests(1, 8, 4, range_ratio=1.0)


def test_percentile_matches_numpy_linear() -> None:
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert _percentile([], 99) == 0.0


def test_summary_and_report() -> None:
    results = [
        RequestResult(prompt_len=10, success=True, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestResult(prompt_len=10, success=True, output_tokens=3, ttft=0.2, latency=0.4, itl=[0.1, 0.1]),
        RequestResult(prompt_len=10, error="HTTPError: HTTP 500"),
    ]
    summary = summarize(results, duration=2.0)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (2, 1, 8)
    assert summary["output_throughput"] == 4.0 and summary["request_throughput"] == 1.0
    assert summary["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert summary["ttft_ms"]["median"] == pytest.approx(150.0)
    report = format_report(summary)
    for label in ("Output token throughput (tok/s):", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):"):
        assert label in report
    assert "error: HTTPError: HTTP 500" in report


def test_bench_serve_against_the_server(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "serve", "--base-url", server.base_url, "--num-prompts", "6", "--max-concurrency", "3",
         "--random-input-len", "12", "--random-output-len", "5", "--random-vocab-size", "400", "--ignore-eos",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^Successful requests: +6$", out, re.M)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["total_output_tokens"] == 30 and saved["total_input_tokens"] == 72
    assert saved["config"]["max_concurrency"] == 3 and len(saved["requests"]) == 6
    assert all(r["output_tokens"] == 5 and r["ttft"] > 0 for r in saved["requests"])


def test_bench_offline_runs_the_same_requests(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "serve", "--offline", "--model", str(checkpoint), "--num-prompts", "4", "--max-concurrency", "2",
         "--random-input-len", "8", "--random-output-len", "4", "--random-vocab-size", "400", "--ignore-eos"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Offline Engine Benchmark Result" in out
    assert re.search(r"^Total generated tokens: +16$", out, re.M)


def test_bench_against_nothing_reports_failures(port, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port()}", "--num-prompts", "2"])
    assert code == 1
    assert "Failed requests:" in capsys.readouterr().out


def test_word_tokenizer_streams_text_for_every_id(tmp_path: Path) -> None:
    from ernie_serve.gateway.bench import write_word_tokenizer
    from ernie_serve.tokenizer import Tokenizer

    write_word_tokenizer(tmp_path, 300)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 300
    assert tokenizer.decode([11, 299, 2, 4]) == "w11 w299"  # special tokens skipped
    assert tokenizer.stop_token_ids == {2, 4}
