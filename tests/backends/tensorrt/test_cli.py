"""Where the TensorRT backend cannot run (here: no tensorrt package, no GPU), every command says so in one line:
`plugins` lists it with the reason and the install line, `serve`/`generate`/`export tensorrt` exit 1 without a
traceback, and the GPU check skips with exit 0."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernie_serve.backends.tensorrt import backend as trt_backend
from ernie_serve.backends.tensorrt.backend import TensorRTBackend, TensorRTOptions
from ernie_serve.cli import main

INSTALL = "pip install 'ernie-serve[tensorrt]'"
needs_no_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="checks a machine without the tensorrt package"
)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    env["ERNIE_SERVE_CACHE"] = os.environ["ERNIE_SERVE_CACHE"]
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ernie-serve: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_registered_with_its_capabilities_and_options() -> None:
    from ernie_serve.core.plugins import get_backend_class

    assert get_backend_class("tensorrt") is TensorRTBackend
    assert TensorRTBackend.capabilities.prefix_caching  # paging stays in ernie-serve
    assert TensorRTBackend.capabilities.devices == ("cuda",)
    assert set(TensorRTOptions.model_fields) == {"tensorrt_cache_dir", "tensorrt_workspace_gib"}


def test_availability_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name))
    assert (
        TensorRTBackend.availability()
        == f"tensorrt not installed: {INSTALL} (on a machine with an NVIDIA GPU and driver)"
    )
    # the bindings wheel without NVIDIA's libraries: installed, but `import tensorrt` fails
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt" else real(name))
    broken = "ImportError: libnvonnxparser.so.10: cannot open shared object file"
    monkeypatch.setattr(trt_backend, "_tensorrt_import_error", lambda: broken)
    assert (
        TensorRTBackend.availability()
        == f"tensorrt is installed but does not import ({broken}): {INSTALL} with NVIDIA's native libraries"
    )
    monkeypatch.setattr(trt_backend, "_tensorrt_import_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU, or no driver
    assert TensorRTBackend.availability() == (
        "no CUDA GPU visible to torch (no NVIDIA GPU or driver): TensorRT engines run on NVIDIA GPUs"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TensorRTBackend.availability() is None


@needs_no_tensorrt
def test_plugins_lists_it_as_not_runnable_with_the_install_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("tensorrt "))
    assert row.split()[1:3] == ["ernie-serve", "0.1.0"] and "unavailable: tensorrt not installed" in row
    assert row.rstrip().endswith(f"{INSTALL} (on a machine with an NVIDIA GPU and driver)")
    assert main(["plugins", "--json"]) == 0
    entry = next(b for b in json.loads(capsys.readouterr().out)["backends"] if b["name"] == "tensorrt")
    assert entry["available"] is False and INSTALL in entry["reason"]


@needs_no_tensorrt
@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--backend", "tensorrt", "--model", "demo", "--port", "0"),
        ("generate", "--backend", "tensorrt", "--model", "demo", "--max-tokens", "2", "hello"),
        ("export", "tensorrt", "--model", "demo", "--output", "{engines}"),
    ],
    ids=["serve", "generate", "export"],
)
def test_commands_exit_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    proc = _cli(*(arg.format(engines=engines) for arg in args))
    line = _one_error_line(proc)
    assert line.endswith(f"tensorrt not installed: {INSTALL} (on a machine with an NVIDIA GPU and driver)"), line
    assert not engines.exists()  # nothing built or written


@needs_no_tensorrt
def test_gpu_check_tensorrt_skips_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ernie_serve.testing.gpu_check", "tensorrt"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"gpu_check tensorrt: skipped, tensorrt not installed: {INSTALL} (on a machine with an NVIDIA GPU and driver)"
    ]
