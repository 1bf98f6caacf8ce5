"""The server process: the model card's FastDeploy command line, the metrics port, SIGTERM while streaming,
and start-up failures as one line on stderr."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ernie_serve.cli import _argv_with_default_command, build_parser, main
from ernie_serve.gateway.sse import decode_stream

PLAS = '{"plas_encoder_top_k_left": 50, "plas_encoder_top_k_right": 60}'


def _finish_reasons(raw: bytes) -> list[str]:
    events = decode_stream([raw])
    assert events[-1] == "[DONE]"
    return [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c.get("finish_reason")]


def test_fastdeploy_command_line_metrics_port_and_sigterm_while_streaming(checkpoint: Path, launch, port) -> None:
    metrics_port = port()
    server = launch(
        checkpoint,
        "--metrics-port", str(metrics_port),
        "--quantization", "wint4",
        "--tensor-parallel-size", "8",
        "--engine-worker-queue-port", str(port()),
        "--max-model-len", "2048",
        "--max-num-seqs", "32",
        "--max-num-batched-tokens", "8192",
        "--enable-chunked-prefill",
        "--plas-attention-config", PLAS,
        "--api-key", "k",
        "--shutdown-timeout", "3",
        subcommand=False,
    )  # fmt: skip
    try:
        log = server.log()
        for flag in (
            "--quantization wint4",
            "--tensor-parallel-size 8",
            "--engine-worker-queue-port",
            "--plas-attention",
        ):
            assert log.count(f"{flag}") == 1 and "has no effect here" in log, log
        # the metrics port serves /metrics only, without a key; the API port wants the key for it
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        assert "ernie_serve:num_requests_running" in httpx.get(f"{metrics_url}/metrics").text
        assert httpx.get(f"{metrics_url}/v1/models").status_code == 404
        assert httpx.get(f"{server.base_url}/metrics").status_code == 401
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(f"{server.base_url}/metrics", headers=headers).status_code == 200

        url = f"{server.base_url}/v1/completions"
        short = {"prompt": "Hi", "max_tokens": 10, "ignore_eos": True, "stream": True}
        long = {"prompt": "Hi", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        with (
            httpx.stream("POST", url, json=short, headers=headers, timeout=60) as first,
            httpx.stream("POST", url, json=long, headers=headers, timeout=60) as second,
        ):
            readers = [first.iter_bytes(), second.iter_bytes()]
            received = [next(r) for r in readers]
            server.proc.send_signal(signal.SIGTERM)
            received = [head + b"".join(r) for head, r in zip(received, readers, strict=True)]
        assert _finish_reasons(received[0]) == ["length"]  # finished within --shutdown-timeout
        assert _finish_reasons(received[1]) == ["abort"]  # cut at the timeout, the stream still ends cleanly
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base_url}/health", timeout=2)
    finally:
        server.stop()


def test_busy_port_is_one_line_and_exit_1(checkpoint: Path, launch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        server = launch(checkpoint, port=busy, wait=False)
        assert server.proc.wait(120) == 1
    log = server.log()
    assert f"ernie-serve: error: cannot listen on 127.0.0.1:{busy}" in log and "Traceback" not in log


def test_bad_model_is_one_line_and_exit_1(tmp_path: Path, launch) -> None:
    server = launch(tmp_path / "missing", wait=False)
    assert server.proc.wait(120) == 1
    log = server.log()
    assert "ernie-serve: error: --model" in log and "Traceback" not in log


def test_bad_server_flag_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000", "--max-concurrency", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "ernie-serve: error: --port: Input should be less than or equal to 65535",
        "ernie-serve: error: --max-concurrency: Input should be greater than or equal to 1",
    ]


def test_no_subcommand_means_serve_and_every_card_flag_parses() -> None:
    argv = ["--model", "m", "--port", "8180", "--metrics-port", "8181", "--enable-chunked-prefill"]
    assert _argv_with_default_command(argv)[0] == "serve"
    assert _argv_with_default_command(["plugins"]) == ["plugins"]
    assert _argv_with_default_command(["--help"]) == ["--help"]
    args = build_parser().parse_args(
        _argv_with_default_command(
            [*argv, "--quantization", "wint4", "--tensor-parallel-size", "8", "--engine-worker-queue-port", "8182",
             "--max-model-len", "32768", "--max-num-seqs", "32", "--max-num-batched-tokens", "8192",
             "--plas-attention-config", PLAS, "--api-key", "a", "--api-key", "b", "--served-model-name", "ernie",
             "--max-concurrency", "4", "--chat-template", "x.jinja", "--backend", "torch", "--scheduler", "fcfs",
             "--log-format", "json", "--host", "127.0.0.1", "--shutdown-timeout", "5"]
        )
    )  # fmt: skip
    assert args.command == "serve" and args.api_key == ["a", "b"] and args.metrics_port == "8181"
    assert args.enable_chunked_prefill is True and args.plas_attention_config == PLAS


def test_console_script_help_lists_serve_and_bench() -> None:
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "serve" in out and "bench" in out
