"""The server process: the model card's FastDeploy command line, the metrics port, SIGTERM while streaming,
and start-up failures as one line on stderr."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ernie_serve.cli import _argv_with_default_command, build_parser, main
from ernie_serve.gateway.sse import decode_stream

PLAS = '{"plas_encoder_top_k_left": 50, "plas_encoder_top_k_right": 60}'


def _stream_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a whole SSE body, which must end with [DONE]."""
    events = decode_stream([raw])
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def _finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]


def _error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("ernie-serve: error:")]


def test_fastdeploy_command_line_metrics_port_and_sigterm_while_streaming(
    checkpoint: Path, launch: Callable[..., Any], port: Callable[[], int], metric: Callable[..., float]
) -> None:
    metrics_port = port()
    server = launch(
        checkpoint,
        "--metrics-port", str(metrics_port),
        "--quantization", "wint4",
        # the card's 8 ranks cannot split the tiny model's 4 heads (refused at start-up, test_parallel.py): 2 do
        "--tensor-parallel-size", "2",
        "--engine-worker-queue-port", str(port()),
        "--max-model-len", "2048",
        "--max-num-seqs", "32",
        "--max-num-batched-tokens", "8192",
        "--enable-chunked-prefill",
        "--plas-attention-config", PLAS,
        "--api-key", "k",
        "--shutdown-timeout", "120",
        subcommand=False,
    )  # fmt: skip
    try:
        # the card's command line runs: one warning per flag that has no effect here, naming it (not
        # --quantization wint4 or --tensor-parallel-size: the torch backend implements them, together)
        notes = [e["event"] for e in server.events(level="warning") if " has no effect here: " in e["event"]]
        assert sorted(note.split(" has no effect here: ")[0] for note in notes) == [
            "--engine-worker-queue-port",
            "--plas-attention-config",
        ], server.log()
        assert server.events(event="tensor-parallel layout")[0]["ranks"] == 2
        # the metrics port serves /metrics only, without a key; the API port wants the key for it
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        scraped = httpx.get(f"{metrics_url}/metrics")
        assert scraped.status_code == 200
        assert metric(scraped.text, "ernie_serve:num_requests_running", model_name=str(checkpoint)) == 0
        # --quantization wint4 took effect: weight bytes by kind, quantized ones among them
        weights = {k: metric(scraped.text, "ernie_serve:weight_bytes", kind=k) for k in ("quantized", "full_precision")}
        assert weights["quantized"] > 0 and weights["full_precision"] > 0
        assert httpx.get(f"{metrics_url}/v1/models").status_code == 404
        assert httpx.get(f"{server.base_url}/metrics").status_code == 401
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(f"{server.base_url}/metrics", headers=headers).status_code == 200

        url = f"{server.base_url}/v1/completions"
        body = {
            "prompt": "Hi",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url, json=body, headers={**headers, "X-Request-Id": "drained"}, timeout=120) as r:
            assert r.status_code == 200
            reader = r.iter_bytes()
            head = next(reader)  # the first chunk is out: the request runs in the engine
            server.wait_for_metrics(
                lambda text: metric(text, "ernie_serve:num_requests_running", model_name=str(checkpoint)) == 1,
                headers=headers,
            )
            server.proc.send_signal(signal.SIGTERM)
            shutting_down = server.wait_for_event(event="shutting down")
            raw = head + b"".join(reader)
        assert (shutting_down["signal"], shutting_down["timeout_s"]) == ("SIGTERM", 120.0)
        # the drain let the running stream finish: every token, then the usage chunk and [DONE]
        chunks = _stream_events(raw)
        assert _finish_reasons(chunks) == ["length"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 200
        assert server.wait_exit() == 0
        events = server.events()
        finished = server.events(event="request finished", request_id="drained")
        assert [(e["finish_reason"], e["output_tokens"]) for e in finished] == [("length", 200)]
        assert events.index(shutting_down) < events.index(finished[0])  # it was still running at SIGTERM
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base_url}/health", timeout=2)
    finally:
        server.stop()


def test_busy_port_is_one_line_and_exit_1(checkpoint: Path, launch: Callable[..., Any]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        server = launch(checkpoint, port=busy, wait=False)
        assert server.wait_exit() == 1
    lines = server.lines()
    errors = _error_lines(lines)
    assert len(errors) == 1 and errors[0] == lines[-1], server.log()
    assert errors[0].startswith(f"ernie-serve: error: cannot listen on 127.0.0.1:{busy}: ")
    assert not any("Traceback" in line for line in lines)
    assert server.events(event="listening") == []  # it failed before starting to serve


def test_bad_model_is_one_line_and_exit_1(tmp_path: Path, launch: Callable[..., Any]) -> None:
    missing = tmp_path / "missing"
    server = launch(missing, wait=False)
    assert server.wait_exit() == 1
    lines = server.lines()
    errors = _error_lines(lines)
    assert len(errors) == 1 and errors[0] == lines[-1], server.log()
    assert errors[0].startswith(f"ernie-serve: error: --model '{missing}' is neither a checkpoint directory")
    assert not any("Traceback" in line for line in lines)
    assert server.events(event="ready to serve") == []


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


def test_console_script_help_lists_serve_and_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width, here and in the subprocess
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"serve", "bench"} <= commands
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == parser.format_help()  # the console script is our parser
    listed = {m.group(1) for m in re.finditer(r"^ {4}(\w+) {2,}\S", proc.stdout, re.M)}
    assert listed == commands  # one help row per subcommand
