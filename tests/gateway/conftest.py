"""Real servers for the gateway tests: `ernie-serve serve` in a subprocess on 127.0.0.1, one per session
(the default one) or per module (servers with keys, limits, or a test that kills them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

SHAPE = "moe_shared_tied"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2, headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not become ready:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def server_env(**extra: str) -> dict[str, str]:
    """The test environment without the user's ERNIE_SERVE_* settings (the cache dir stays)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ERNIE_SERVE_", "FD_API_KEY"))}
    env["ERNIE_SERVE_CACHE"] = os.environ["ERNIE_SERVE_CACHE"]
    # One compute thread: the tiny models gain nothing from two, and on a 2-core machine shared with the test
    # client a second OpenMP thread that gets descheduled stalls every step.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start_server(
    checkpoint: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait: bool = True,
    subcommand: bool = True,
) -> ServerProcess:
    """`python -m ernie_serve.cli serve --model CHECKPOINT --host 127.0.0.1 --port PORT ARGS...`; without
    `subcommand`, FastDeploy style (`ernie-serve --model ...`)."""
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="ernie-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "ernie_serve.cli", *(["serve"] if subcommand else [])]
    cmd += ["--model", str(checkpoint), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env or server_env())
    server = ServerProcess(proc, port, Path(log_file.name))
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint(SHAPE)


@pytest.fixture(scope="session")
def server(checkpoint: Path) -> Iterator[ServerProcess]:
    """The shared server: no keys, no limits."""
    proc = start_server(checkpoint, "--served-model-name", "ernie-tiny")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path):
    from ernie_serve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(checkpoint)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text output (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="session")
def metric():
    """`metric(text, name, **labels)` -> the sample's value (test modules cannot import conftest)."""
    return metric_value


@pytest.fixture(scope="session")
def launch():
    """`launch(checkpoint, *flags, env=..., wait=True)` -> a started `ServerProcess` (stop it yourself)."""
    return start_server


@pytest.fixture(scope="session")
def port():
    """`port()` -> a free TCP port on 127.0.0.1."""
    return free_port
