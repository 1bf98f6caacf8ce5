"""Real servers for the gateway tests: `ernie-serve serve` in a subprocess on 127.0.0.1, one per session
(the default one) or per module (servers with keys, limits, or a test that kills them).

The servers log JSON (`--log-format json`) to a pipe that a thread reads line by line, so a test waits for
the exact event it needs ("ready to serve", the "request finished" line of one request id) instead of
sleeping. Engine state that is not logged (running requests, KV usage) is read from `/metrics`, in a loop
paced by the HTTP round trip itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SHAPE = "moe_shared_tied"
START_TIMEOUT = 120.0
EVENT_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerExited(RuntimeError):
    """The server process ended while a test waited for something it never logged."""


class ServerProcess:
    """One `ernie-serve serve` process and everything it has written to stdout and stderr so far."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self._lines: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"server-log-{port}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # blocks until the server writes a line (or exits)
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._changed:
                self._lines.append(line)
                if isinstance(event, dict):
                    self._events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def events(self, **fields: Any) -> list[dict[str, Any]]:
        """The JSON log events logged so far whose keys include `fields` with exactly those values."""
        with self._changed:
            return [e for e in self._events if all(k in e and e[k] == v for k, v in fields.items())]

    def wait_for_event(self, timeout: float = EVENT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Block until the server logs an event with `fields` (woken by each new line); returns it."""
        with self._changed:
            found = self._changed.wait_for(lambda: self._match(fields) is not None or self._eof, timeout)
            event = self._match(fields)
            if event is not None:
                return event
            log = "\n".join(self._lines)
        if found:  # the output ended without it
            self.proc.wait(30)
            raise ServerExited(f"the server exited with {self.proc.returncode} before logging {fields}:\n{log}")
        raise AssertionError(f"the server did not log {fields} within {timeout} s:\n{log}")

    def _match(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        return next((e for e in self._events if all(k in e and e[k] == v for k, v in fields.items())), None)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the gateway's "ready to serve" event, then check that `/health` agrees."""
        self.wait_for_event(timeout, event="ready to serve")
        # The event is logged by the engine loader, which uvicorn starts just before it begins listening:
        # the transport retries a refused connection in that window.
        with httpx.Client(transport=httpx.HTTPTransport(retries=5)) as client:
            response = client.get(f"{self.base_url}/health", timeout=10)
        assert (response.status_code, response.json()) == (200, {"status": "ok"}), response.text

    def metrics(self, headers: dict[str, str] | None = None) -> str:
        response = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.text

    def wait_for_metrics(
        self,
        predicate: Callable[[str], bool],
        timeout: float = EVENT_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Scrape `/metrics` until `predicate(text)` holds; each try is one HTTP round trip (no sleeping).
        Returns the text that satisfied it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.metrics(headers)
            if predicate(text):
                return text
            if self.proc.poll() is not None:
                raise ServerExited(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            assert time.monotonic() < deadline, f"/metrics never satisfied the condition:\n{text}"

    def wait_exit(self, timeout: float = 120.0) -> int:
        """The exit status, once the process has ended and its output is read to the end."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(30)
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
    """`python -m ernie_serve.cli serve --model CHECKPOINT --host 127.0.0.1 --port PORT --log-format json
    ARGS...`; without `subcommand`, FastDeploy style (`ernie-serve --model ...`)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "ernie_serve.cli", *(["serve"] if subcommand else [])]
    cmd += ["--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    if "--log-format" not in args:
        cmd += ["--log-format", "json"]
    cmd += args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or server_env())
    server = ServerProcess(proc, port)
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint(SHAPE)


@pytest.fixture(scope="session")
def server(checkpoint: Path) -> Iterator[ServerProcess]:
    """The shared server: no keys, no limits."""
    proc = start_server(checkpoint, "--served-model-name", "ernie-tiny")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path) -> Any:
    from ernie_serve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(checkpoint)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` with `labels` in Prometheus text output. A missing sample, or
    several that match, fail the test: an absent metric must not read as 0."""
    matches = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            matches.append(line)
    assert len(matches) == 1, f"{len(matches)} samples of {name} with {labels}: {matches}"
    return float(matches[0].rsplit(" ", 1)[1])


@pytest.fixture(scope="session")
def metric() -> Callable[..., float]:
    """`metric(text, name, **labels)` -> the sample's value (test modules cannot import conftest)."""
    return metric_value


@pytest.fixture(scope="session")
def launch() -> Callable[..., ServerProcess]:
    """`launch(checkpoint, *flags, env=..., wait=True)` -> a started `ServerProcess` (stop it yourself)."""
    return start_server


@pytest.fixture(scope="session")
def port() -> Callable[[], int]:
    """`port()` -> a free TCP port on 127.0.0.1."""
    return free_port


@pytest.fixture(scope="session")
def environment() -> Callable[..., dict[str, str]]:
    """`environment(**extra)` -> the environment for a server subprocess (see `server_env`)."""
    return server_env
