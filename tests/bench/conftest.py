"""Fixtures of the benchmark smoke tests: the tiny checkpoint, and a real server on it for `bench serve`."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ernie_serve.bench.soak import started_server


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
def server_url(bench_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ernie-serve serve` on the tiny checkpoint in a subprocess; yields its base URL once /health is 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    env["ERNIE_SERVE_CACHE"] = os.environ["ERNIE_SERVE_CACHE"]
    env["OMP_NUM_THREADS"] = "1"  # the tiny model gains nothing from more, and the client shares the cores
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    with started_server(str(bench_model), ["--served-model-name", "ernie-tiny"], log, env=env) as (url, _):
        yield url
