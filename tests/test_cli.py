"""The `ernie-serve` command: `plugins` output, generated flags and one-line validation errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from ernie_serve.cli import build_parser, main
from ernie_serve.cli_options import env_var_name, field_to_flag, flag_to_field, settings_from_args
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
    _install_plugin(tmp_path, monkeypatch, "frob", "frob_cli_plugin", UNAVAILABLE_PLUGIN, "frob-serve 0.4.0")
    yield tmp_path
    sys.modules.pop("frob_cli_plugin", None)


def _install_plugin(
    where: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str, source: str, release: str
) -> None:
    """An installed-looking distribution (`release`: "name version") on sys.path, whose `ernie_serve` entry
    point `name` is `module`, written from `source`."""
    distribution, version = release.split()
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[ernie_serve]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(where))
    plugins.reset_plugin_manager()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _sections(text: str) -> dict[str, dict[str, str]]:
    """`plugins` output as {section title: {name: its row}}; indented detail lines under a row are skipped."""
    sections: dict[str, dict[str, str]] = {}
    rows: dict[str, str] = {}
    for line in _lines(text):
        if not line[0].isspace():
            rows = sections.setdefault(line.rstrip(":"), {})
        elif not line.startswith("   "):
            name = line.split()[0]
            assert name not in rows, f"{name} listed twice: {text}"
            rows[name] = line
    return sections


# --- plugins -------------------------------------------------------------------------------------------


def test_plugins_lists_builtins_with_provenance(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    sections = _sections(capsys.readouterr().out)
    version = metadata.version("ernie-serve")
    models = next(rows for title, rows in sections.items() if title.startswith("Models"))
    for rows, name in (
        (sections["Backends"], "torch"),
        (sections["Backends"], "onnx"),
        (sections["Schedulers"], "fcfs"),
        (sections["Schedulers"], "priority"),
        (models, "Ernie4_5_MoeForCausalLM"),
        (models, "Ernie4_5ForCausalLM"),
    ):
        assert rows[name].split()[1:3] == ["ernie-serve", version], rows[name]  # provenance: our distribution
    torch = sections["Backends"]["torch"]  # needs the lead's TorchBackend
    assert torch.split()[-1] == "available", torch  # the status column, not "unavailable: ..."


def test_plugins_shows_why_a_backend_cannot_run(frob_dist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    frob = _sections(capsys.readouterr().out)["Backends"]["frob"]
    assert frob.split()[1:3] == ["frob-serve", "0.4.0"]
    assert frob.endswith("  unavailable: needs an NVIDIA GPU and tensorrt>=10 (pip install tensorrt)")


def test_plugins_json(frob_dist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    frob = next(b for b in doc["backends"] if b["name"] == "frob")
    assert frob["available"] is False
    assert frob["reason"] == "needs an NVIDIA GPU and tensorrt>=10 (pip install tensorrt)"
    assert frob["distribution"] == "frob-serve" and frob["version"] == "0.4.0"
    torch = next(b for b in doc["backends"] if b["name"] == "torch")
    assert (torch["available"], torch["distribution"]) == (True, "ernie-serve")
    assert {s["name"] for s in doc["schedulers"]} >= {"fcfs", "priority"}
    assert doc["failed_plugins"] == []


def test_plugins_lists_failed_plugins(
    frob_dist: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (frob_dist / "frob_cli_plugin.py").write_text("raise ImportError('libfrob.so missing')\n")
    assert main(["plugins"]) == 0
    sections = _sections(capsys.readouterr().out)
    failed = next(rows for title, rows in sections.items() if title.startswith("Failed plugins"))
    assert failed["frob"].split()[1:3] == ["frob-serve", "0.4.0"] and "libfrob.so missing" in failed["frob"]
    assert "frob" not in sections["Backends"]  # and not listed as a backend


def test_console_script_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(sys.executable).parent / "ernie-serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_SERVE_")}
    proc = subprocess.run([str(script), "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert main(["plugins"]) == 0
    assert proc.stdout == capsys.readouterr().out  # the installed command is this CLI, with the same plugins


# --- generated flags -----------------------------------------------------------------------------------


def test_every_settings_field_has_a_flag() -> None:
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    help_text = generate.format_help()  # renders (a stray "%" in a description would break it)
    actions = {flag: action for action in generate._actions for flag in action.option_strings}
    # `backend_options` is the one exception: each backend's options are flags of their own (test_cli_options.py)
    for name in EngineSettings.model_fields.keys() - {"backend_options"}:
        flag = field_to_flag(name)
        assert flag_to_field(flag) == name
        assert actions[flag].dest == name, flag
        assert f"env {env_var_name(EngineSettings, name)}" in (actions[flag].help or ""), flag  # its own help
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), flag
    assert actions["--no-enable-prefix-caching"].dest == "enable_prefix_caching"
    assert env_var_name(EngineSettings, "max_num_seqs") == "ERNIE_SERVE_MAX_NUM_SEQS"


def test_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("ERNIE_SERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("ERNIE_SERVE_BLOCK_SIZE", "32")
    args = parser.parse_args(["generate", "--max-num-seqs", "4", "--no-enable-prefix-caching", "hi"])
    settings = settings_from_args(args, EngineSettings)
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
            "ernie-serve: error: --quantization: Input should be 'wint8' or 'wint4'",
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
        main(["generate", "--max-num-seqs", "4", "--frobnicate", "hello"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "ernie-serve: error: unrecognized arguments: --frobnicate"


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


def _throughput_summary(path: Path, out: str, num_requests: int) -> dict[str, Any]:
    """The JSON of a `bench throughput` run, checked against itself and against what it printed."""
    summary = json.loads(path.read_text())
    results = summary["results"]
    for r in results:
        assert r["requests"] == num_requests, r
        assert r["tokens_per_second"] == pytest.approx(r["output_tokens"] / r["seconds"]), r
    assert len({r["output_tokens"] for r in results}) == 1  # every system ran the same requests
    decode = summary["single_request_decode_tok_s"]
    printed = [
        float(m.group(1))
        for m in (
            re.fullmatch(r"single-request decode \(.+, median of \d+\): ([\d.]+) tok/s", line)
            for line in out.splitlines()
        )
        if m
    ]
    assert decode > 0 and printed[0] == round(decode, 1)
    return summary


def test_export_onnx_and_bench_commands_are_wired(
    tmp_path: Path, tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx
    import torch

    assert main(["export", "onnx", "--model", "demo", "--output", str(tmp_path / "onnx")]) == 0
    exported = tmp_path / "onnx" / "model.onnx"
    onnx.checker.check_model(str(exported))  # a valid graph, whatever the command printed
    checker = [line.strip() for line in capsys.readouterr().out.splitlines() if "onnx.checker" in line]
    assert len(checker) == 1 and checker[0].startswith("onnx.checker: passed"), checker

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    result = tmp_path / "throughput.json"
    args = ["bench", "throughput", "--model", str(checkpoint), "--num-requests", "3", "--output-json", str(result)]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = _throughput_summary(result, out, 3)
    engine, reference = summary["results"][0], summary["results"][-1]
    assert (engine["system"], reference["system"]) == ("ernie-serve (torch)", "transformers")
    assert summary["ratio"] == pytest.approx(engine["tokens_per_second"] / reference["tokens_per_second"])
    assert f"ernie-serve / transformers throughput: {summary['ratio']:.2f}x" in out.splitlines()

    assert main(["bench", "scheduler"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["running", "us/step", "us/request"]
    rows = [[float(x) for x in line.split()] for line in lines[1:]]
    assert [int(running) for running, _, _ in rows] == [1, 8, 32, 128, 512]
    for running, per_step, per_request in rows:  # the per-request cost is the step cost shared out
        assert per_request == pytest.approx(per_step / running, abs=0.06)


def test_bench_throughput_runs_any_backend_and_rejects_unknown_ones(
    tmp_path: Path, tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    result = tmp_path / "onnx.json"
    args = ["bench", "throughput", "--model", str(checkpoint), "--num-requests", "2", "--skip-transformers"]
    assert main([*args, "--backend", "onnx", "--output-json", str(result)]) == 0
    summary = _throughput_summary(result, capsys.readouterr().out, 2)
    assert [r["system"] for r in summary["results"]] == ["ernie-serve (onnx)"]
    assert "ratio" not in summary  # nothing to compare with

    assert main([*args, "--backend", "nope"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("ernie-serve: error: unknown backend 'nope'")


BROKEN_PLUGIN = """
from ernie_serve.core.backend import Backend
from ernie_serve.core.errors import UserError
from ernie_serve.core.hookspecs import hookimpl


class NeedsLicense(UserError, RuntimeError):
    pass


class Buggy(Backend):
    def load(self, model_config, settings, model_path, options):
        raise ValueError("internal index went negative")

    kv_cache_spec = allocate_kv_cache = execute = load


class Unlicensed(Buggy):
    def load(self, model_config, settings, model_path, options):
        raise NeedsLicense("set FROB_LICENSE to your licence key")


@hookimpl
def register_backends(register):
    register("buggy", Buggy)
    register("unlicensed", Unlicensed)
"""


@pytest.mark.parametrize(
    ("backend", "one_line"),
    [("unlicensed", "ernie-serve: error: set FROB_LICENSE to your licence key"), ("buggy", None)],
)
def test_only_user_errors_are_one_line(
    backend: str, one_line: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A UserError is the user's to fix: one line. Any other exception is a bug: its traceback is shown."""
    _install_plugin(tmp_path, monkeypatch, "broken", "broken_cli_plugin", BROKEN_PLUGIN, "broken-serve 0.1.0")
    try:
        if one_line is not None:
            assert main(["generate", "--backend", backend, "--max-tokens", "2", "hi"]) == 1
            assert capsys.readouterr().err.splitlines()[-1] == one_line
        else:
            with pytest.raises(ValueError, match="internal index went negative"):
                main(["generate", "--backend", backend, "--max-tokens", "2", "hi"])
    finally:
        sys.modules.pop("broken_cli_plugin", None)


def test_bench_quantization_trained_without_transformers_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path))  # no trained model cached: it would have to train
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it fails
    assert main(["bench", "quantization", "--trained"]) == 1
    err = capsys.readouterr().err
    assert "needs transformers: pip install 'ernie-serve[test]'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing half-trained left behind
