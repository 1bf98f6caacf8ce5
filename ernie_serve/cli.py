"""The `ernie-serve` command.

Subcommands:
- `plugins`: every registered backend, scheduler and model architecture, where it comes from, and whether
  each backend can run on this machine; plugins that failed to load, with the reason.
- `generate`: offline generation with the `LLM` API, streaming text to stdout as it is produced.

Errors the user can fix (bad flag values, unknown backend, missing checkpoint) are one line on stderr and
a non-zero exit, never a traceback; argparse usage errors exit 2 as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from ernie_serve.cli_options import (
    PROG,
    add_settings_arguments,
    format_validation_error,
    given_settings,
    settings_from_args,
)
from ernie_serve.core.config import EngineSettings
from ernie_serve.logging import LOG_FORMATS, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    from ernie_serve.core.plugins import Registration, Registry
    from ernie_serve.core.sampling_params import SamplingParams

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed (model missing, backend unavailable)
EXIT_USAGE = 2  # bad flags or values, as argparse uses

# Sampling flags of `generate` -> SamplingParams fields, used to name the flag in error messages.
_SAMPLING_FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
}


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("ERNIE_SERVE_LOG_LEVEL", "info").lower(),
        help="log level (default: info; env ERNIE_SERVE_LOG_LEVEL)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; called by `main` (and by tests/docs that want the generated --help)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve and run Baidu ERNIE 4.5 models with swappable backends.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plugins = sub.add_parser(
        "plugins",
        help="list registered backends, schedulers and models",
        description="List every registered backend, scheduler and model architecture, with the "
        "distribution that provides it and whether each backend can run on this machine.",
    )
    plugins.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    plugins.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("ERNIE_SERVE_LOG_FORMAT", "console"),
        help="log output format (default: console; env ERNIE_SERVE_LOG_FORMAT)",
    )
    _add_log_level(plugins)

    generate = sub.add_parser(
        "generate",
        help="generate text offline, streaming it to stdout",
        description="Generate a completion for each PROMPT, streaming text to stdout as it is produced. "
        "Engine options also read ERNIE_SERVE_* environment variables.",
    )
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text; '-' reads stdin")
    engine = generate.add_argument_group("engine options")
    # `--seed` and `--log-format` are EngineSettings fields, so they come from here: the engine seed is
    # also the default seed of requests, which is what `--seed` should mean for sampling too.
    add_settings_arguments(engine, EngineSettings)
    _add_log_level(generate)
    sampling = generate.add_argument_group("sampling options")
    sampling.add_argument(
        "--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)"
    )
    sampling.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's, else 1.0)"
    )
    sampling.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus mass in (0, 1] (default: the checkpoint's, else 1.0)",
    )
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off")
    sampling.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user turn in the chat template"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ernie-serve` console script; returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ernie-serve plugins | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not print a second BrokenPipeError, and exit quietly (Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plugins":
        try:
            configure_logging(args.log_format, args.log_level)
        except ValueError as exc:  # a bad ERNIE_SERVE_LOG_FORMAT (argparse does not check env defaults)
            _error(str(exc))
            return EXIT_USAGE
        return _cmd_plugins(args, sys.stdout)
    if args.command == "generate":
        return _cmd_generate(args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: subparsers are required
    return EXIT_USAGE


# --- plugins -------------------------------------------------------------------------------------------


def _source(item: Registration[Any]) -> str:
    dist = f"{item.distribution} {item.version or '?'}" if item.distribution else "unknown distribution"
    return f"{dist} [{item.provider}]"


def _availability(backend_cls: Any) -> str | None:
    try:
        return backend_cls.availability()
    except Exception as exc:  # the contract says it must not raise; a plugin bug still must not crash us
        return f"availability check failed: {type(exc).__name__}: {exc}"


def _plugins_json(reg: Registry) -> dict[str, Any]:
    def item(r: Registration[Any], **more: Any) -> dict[str, Any]:
        obj = r.obj
        qualname = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        return {
            "name": r.name,
            "object": qualname,
            "provider": r.provider,
            "distribution": r.distribution,
            "version": r.version,
            **more,
        }

    backends = []
    for r in reg.backends.values():
        reason = _availability(r.obj)
        backends.append(item(r, available=reason is None, reason=reason))
    return {
        "backends": backends,
        "schedulers": [item(r) for r in reg.schedulers.values()],
        "models": [item(r) for r in reg.models.values()],
        "gateway_routes": [item(r) for r in reg.gateway_routes],
        "request_transforms": [item(r) for r in reg.request_transforms.values()],
        "plugins": [vars(p) for p in reg.plugins],
        "failed_plugins": [vars(f) for f in reg.failures],
    }


def _table(out: TextIO, title: str, rows: list[tuple[str, ...]]) -> None:
    out.write(f"{title}:\n")
    if not rows:
        out.write("  (none)\n")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)] + [row[-1]]
        out.write("  " + "  ".join(cells).rstrip() + "\n")


def _cmd_plugins(args: argparse.Namespace, out: TextIO) -> int:
    from ernie_serve.core.plugins import registry

    reg = registry()
    if args.json:
        json.dump(_plugins_json(reg), out, indent=2)
        out.write("\n")
        return EXIT_OK
    backend_rows = []
    for r in reg.backends.values():
        reason = _availability(r.obj)
        backend_rows.append((r.name, _source(r), "available" if reason is None else f"unavailable: {reason}"))
    _table(out, "Backends", backend_rows)
    _table(out, "Schedulers", [(r.name, _source(r)) for r in reg.schedulers.values()])
    _table(out, "Models (torch backend architectures)", [(r.name, _source(r)) for r in reg.models.values()])
    if reg.gateway_routes:
        _table(out, "Gateway routes", [(r.name, _source(r)) for r in reg.gateway_routes])
    if reg.request_transforms:
        _table(out, "Request transforms", [(r.name, _source(r)) for r in reg.request_transforms.values()])
    if reg.failures:
        failed = [
            (f.name, f"{f.distribution} {f.version or '?'}" if f.distribution else "-", f.error)
            for f in reg.failures
        ]
        _table(out, "Failed plugins (skipped)", failed)
    return EXIT_OK


# --- generate ------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")


def _sampling_params(args: argparse.Namespace, settings: EngineSettings, seed_given: bool) -> SamplingParams:
    from ernie_serve.core.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        # Only an explicit --seed pins each request's generator; otherwise the engine's default applies.
        seed=settings.seed if seed_given else None,
    )


def _read_prompts(prompts: Sequence[str]) -> list[str]:
    return [sys.stdin.read() if p == "-" else p for p in prompts]


def _cmd_generate(args: argparse.Namespace) -> int:
    from ernie_serve.core.sampling_params import SamplingParamsError

    given = given_settings(args, EngineSettings)
    try:
        settings = settings_from_args(args, EngineSettings)
    except ValidationError as exc:
        for line in format_validation_error(exc, EngineSettings, given):
            sys.stderr.write(line + "\n")
        return EXIT_USAGE
    assert isinstance(settings, EngineSettings)
    try:
        params = _sampling_params(args, settings, seed_given="seed" in given)
    except SamplingParamsError as exc:
        _error(f"{_SAMPLING_FLAGS.get(exc.param, exc.param)}: {exc}")
        return EXIT_USAGE
    configure_logging(settings.log_format, args.log_level)
    prompts = _read_prompts(args.prompts)

    from ernie_serve.core.backend import BackendUnavailableError
    from ernie_serve.core.config import ModelConfigError
    from ernie_serve.core.plugins import UnknownPluginError
    from ernie_serve.llm import LLM

    # Errors a user fixes by changing flags or installing something: one line, no traceback.
    user_errors = (BackendUnavailableError, ModelConfigError, UnknownPluginError, OSError, ValueError)
    out = sys.stdout
    llm: LLM | None = None
    try:
        llm = LLM.from_settings(settings)
        for i, prompt in enumerate(prompts):
            if i:
                out.write("\n")  # a blank line between completions of several prompts
            for delta in llm.stream(prompt, params, chat=args.chat):
                out.write(delta)
                out.flush()  # stream: show each piece as soon as it is decoded
            out.write("\n")
            out.flush()
    except user_errors as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        out.write("\n")
        return 130  # the shell convention for SIGINT
    finally:
        # Release the backend (threads, device memory) even on errors; `close` is optional in the API.
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
