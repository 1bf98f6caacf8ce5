"""Fixtures of the benchmark smoke tests: the tiny checkpoint, and a real server on it for `bench serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def bench_model(tiny_checkpoint) -> Path:
    """The tiny MoE checkpoint (shared with the rest of the session): benchmarks here check wiring, not speed."""
    return tiny_checkpoint("moe_shared_tied")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    return free_port()


@pytest.fixture(scope="module")
def server_url(bench_model: Path) -> Iterator[str]:
    """`ernie-serve serve` on the tiny checkpoint in a subprocess; yields its base URL once /health is 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    env["ERNIE_SERVE_CACHE"] = os.environ["ERNIE_SERVE_CACHE"]
    env["OMP_NUM_THREADS"] = "1"  # the tiny model gains nothing from more, and the client shares the cores
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "ernie_serve.cli", "serve", "--model", str(bench_model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "ernie-tiny"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not become ready:\n{Path(log.name).read_text()}")
            try:  # the pause between polls is a wait for the server to die, which ends it at once
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{Path(log.name).read_text()}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
