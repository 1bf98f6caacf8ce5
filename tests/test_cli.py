"""The `ernie-serve` command: `plugins` output, generated flags and one-line validation errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from ernie_serve.cli import build_parser, main
from ernie_serve.cli_options import field_to_flag, flag_to_field, settings_from_args
from ernie_serve.core import plugins
from ernie_serve.core.config import EngineSettings

UNAVAILABLE_PLUGIN = """
from ernie_serve.core.backend import unavailable_backend
from ernie_serve.core.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    register("frob", unavailable_backend("frob", "needs an NVIDIA GPU and tensorrt>=10 (pip install tensorrt)"))
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("ERNIE_SERVE_"):
            monkeypatch.delenv(name)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


@pytest.fixture
def frob_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed-looking third-party distribution whose backend cannot run here."""
    (tmp_path / "frob_cli_plugin.py").write_text(textwrap.dedent(UNAVAILABLE_PLUGIN))
    info = tmp_path / "frob_serve-0.4.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: frob-serve\nVersion: 0.4.0\n")
    (info / "entry_points.txt").write_text("[ernie_serve]\nfrob = frob_cli_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset_plugin_manager()
    yield tmp_path
    sys.modules.pop("frob_cli_plugin", None)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- plugins -------------------------------------------------------------------------------------------


def test_plugins_lists_builtins_with_provenance(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    version = metadata.version("ernie-serve")
    lines = _lines(out)
    fcfs = next(line for line in lines if line.split()[0] == "fcfs")
    assert f"ernie-serve {version}" in fcfs
    torch = next(line for line in lines if line.split()[0] == "torch")  # needs the lead's TorchBackend
    assert torch.rstrip().endswith("available")
    assert any(line.split()[0] == "Ernie4_5_MoeForCausalLM" for line in lines)
    assert any(line.split()[0] == "Ernie4_5ForCausalLM" for line in lines)


def test_plugins_shows_why_a_backend_cannot_run(frob_dist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    frob = next(line for line in _lines(capsys.readouterr().out) if line.split()[0] == "frob")
    assert "frob-serve 0.4.0" in frob
    assert "unavailable: needs an NVIDIA GPU and tensorrt>=10 (pip install tensorrt)" in frob


def test_plugins_json(frob_dist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    frob = next(b for b in doc["backends"] if b["name"] == "frob")
    assert frob["available"] is False
    assert frob["distribution"] == "frob-serve" and frob["version"] == "0.4.0"
    assert {s["name"] for s in doc["schedulers"]} >= {"fcfs"}
    assert doc["failed_plugins"] == []


def test_plugins_lists_failed_plugins(
    frob_dist: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (frob_dist / "frob_cli_plugin.py").write_text("raise ImportError('libfrob.so missing')\n")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "Failed plugins" in out
    failed = next(line for line in _lines(out) if line.split()[0] == "frob")
    assert "frob-serve 0.4.0" in failed and "libfrob.so missing" in failed


def test_console_script_plugins() -> None:
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    proc = subprocess.run([str(script), "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fcfs" in proc.stdout and "torch" in proc.stdout
    assert "Traceback" not in proc.stderr


# --- generated flags -----------------------------------------------------------------------------------


def test_every_settings_field_has_a_flag() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # type: ignore[union-attr]
    for name in EngineSettings.model_fields:
        flag = field_to_flag(name)
        assert flag in help_text
        assert flag_to_field(flag) == name
    assert "--no-enable-prefix-caching" in help_text
    assert "ERNIE_SERVE_MAX_NUM_SEQS" in help_text


def test_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("ERNIE_SERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("ERNIE_SERVE_BLOCK_SIZE", "32")
    args = parser.parse_args(["generate", "--max-num-seqs", "4", "--no-enable-prefix-caching", "hi"])
    settings = settings_from_args(args, EngineSettings)
    assert isinstance(settings, EngineSettings)
    assert settings.max_num_seqs == 4  # flag
    assert settings.block_size == 32  # env
    assert settings.max_num_batched_tokens == EngineSettings.model_fields["max_num_batched_tokens"].default
    assert settings.enable_prefix_caching is False
    assert settings.enable_chunked_prefill is True  # bool flag not given: default, not False


# --- one-line errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--max-num-seqs", "0"],
            "ernie-serve: error: --max-num-seqs: Input should be greater than or equal to 1",
        ),
        (
            ["--dtype", "float8"],
            "ernie-serve: error: --dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'",
        ),
        (
            ["--max-num-batched-tokens", "lots"],
            "ernie-serve: error: --max-num-batched-tokens: Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            ["--quantization", "wint3"],
            "ernie-serve: error: --quantization: Value error, unknown quantization 'wint3'; choose wint8 or wint4",
        ),
        (["--top-p", "2"], "ernie-serve: error: --top-p: top_p must be in (0, 1], got 2.0"),
    ],
)
def test_bad_value_is_one_line_and_exit_2(flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", *flags, "hello"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [expected]
    assert captured.out == ""


def test_several_bad_values_give_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--max-num-seqs", "0", "--dtype", "float8", "hello"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert {line.split(":")[2].strip() for line in lines} == {"--max-num-seqs", "--dtype"}


def test_bad_env_value_names_the_env_var_and_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ERNIE_SERVE_MAX_NUM_SEQS", "0")
    assert main(["generate", "hello"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ernie-serve: error: ERNIE_SERVE_MAX_NUM_SEQS (--max-num-seqs): Input should be greater than or equal to 1"
    ]


def test_unknown_flag_is_argparse_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["generate", "--max-num-seq", "4", "--frobnicate", "hello"])
    assert excinfo.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_console_script_bad_value_has_no_traceback() -> None:
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    proc = subprocess.run(
        [str(script), "generate", "--max-num-seqs", "0", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "ernie-serve: error: --max-num-seqs: Input should be greater than or equal to 1"
    ]


def test_export_onnx_and_bench_commands_are_wired(tmp_path, tiny_checkpoint, capsys) -> None:
    import json

    import torch

    from ernie_serve.cli import main

    assert main(["export", "onnx", "--model", "demo", "--output", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert "onnx.checker: passed" in capsys.readouterr().out

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    result = tmp_path / "throughput.json"
    args = ["bench", "throughput", "--model", str(checkpoint), "--num-requests", "3", "--output-json", str(result)]
    assert main(args) == 0
    summary = json.loads(result.read_text())
    assert summary["ratio"] > 0 and summary["single_request_decode_tok_s"] > 0
    assert "ernie-serve / transformers throughput" in capsys.readouterr().out

    assert main(["bench", "scheduler"]) == 0
    assert "us/request" in capsys.readouterr().out


def test_bench_throughput_runs_any_backend_and_rejects_unknown_ones(tmp_path, tiny_checkpoint, capsys) -> None:
    import json

    import torch

    from ernie_serve.cli import main

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    result = tmp_path / "onnx.json"
    args = ["bench", "throughput", "--model", str(checkpoint), "--num-requests", "2", "--skip-transformers"]
    assert main([*args, "--backend", "onnx", "--output-json", str(result)]) == 0
    summary = json.loads(result.read_text())
    assert summary["results"][0]["system"] == "ernie-serve (onnx)"
    assert summary["single_request_decode_tok_s"] > 0
    capsys.readouterr()

    assert main([*args, "--backend", "nope"]) == 1
    assert "unknown backend 'nope'" in capsys.readouterr().err
