"""Command-line flags generated from pydantic-settings models, and one-line error messages naming them.

Shared by every CLI subcommand that builds settings (`generate`, `serve`), so a new settings
field is a new flag everywhere with no CLI change. Precedence: an explicit flag, then the `ERNIE_SERVE_*`
environment variable, then the field default; that falls out of passing only the flags the user gave.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

PROG = "ernie-serve"


def field_to_flag(field_name: str) -> str:
    """`max_num_seqs` -> `--max-num-seqs` (the FastDeploy/vLLM spelling)."""
    return "--" + field_name.replace("_", "-")


def flag_to_field(flag: str) -> str:
    """`--max-num-seqs` -> `max_num_seqs`."""
    return flag.lstrip("-").replace("-", "_")


def env_var_name(settings_cls: type[BaseSettings], field_name: str) -> str:
    """The environment variable pydantic-settings reads for a field, e.g. `ERNIE_SERVE_MAX_NUM_SEQS`."""
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    return f"{prefix}{field_name}".upper()


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_list(annotation: Any) -> bool:
    """`list[str]` or a union with one (`list[str] | str`): the flag may be repeated."""
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) field, for the help text."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _help(settings_cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    text = info.description or ""
    default = info.get_default(call_default_factory=True)
    extra = f"env {env_var_name(settings_cls, name)}"
    if default is not None and "default" not in text:  # descriptions may explain a None default already
        extra = f"default: {default}; {extra}"
    # argparse expands %-formats in help; escape ours so e.g. "90%" cannot break --help.
    return (f"{text} ({extra})" if text else f"({extra})").replace("%", "%%")


def add_settings_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings_cls: type[BaseSettings],
    exclude: Iterable[str] = (),
) -> None:
    """Called while building a subcommand's parser: add one flag per field of `settings_cls`.

    Every flag defaults to None, meaning "not given", so `settings_from_args` passes only given flags and
    pydantic-settings falls back to the environment and then to the field default. Values stay strings:
    pydantic converts and validates them, so a bad value gets the same message from a flag or from env.
    """
    skip = set(exclude)
    for name, info in settings_cls.model_fields.items():
        if name in skip:
            continue
        flag = field_to_flag(name)
        help_text = _help(settings_cls, name, info)
        if _is_bool(info.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if _is_list(info.annotation):
            parser.add_argument(
                flag, dest=name, action="append", default=None, metavar=name.upper(), help=help_text + " [repeatable]"
            )
            continue
        choices = _literal_choices(info.annotation)
        # No argparse `choices=`: pydantic's message ("Input should be 'auto', 'float32' ...") is the one
        # error format for flags and env vars alike; the metavar still shows the choices in --help.
        metavar = "{" + ",".join(str(c) for c in choices) + "}" if choices else name.upper()
        parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def given_settings(namespace: argparse.Namespace, settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The settings fields the user gave as flags (not None) in a parsed namespace."""
    values = vars(namespace)
    return {name: values[name] for name in settings_cls.model_fields if name in values and values[name] is not None}


def settings_from_args(namespace: argparse.Namespace, settings_cls: type[BaseSettings]) -> BaseSettings:
    """Called after parsing: build the settings from the given flags (+ env + defaults).

    Raises pydantic's `ValidationError`; turn it into messages with `format_validation_error`.
    """
    return settings_cls(**given_settings(namespace, settings_cls))


def format_validation_error(
    error: ValidationError, settings_cls: type[BaseSettings], given: Mapping[str, Any]
) -> list[str]:
    """One line per error, naming the flag (or the env var, when the bad value came from the environment):

    `ernie-serve: error: --max-num-seqs: Input should be greater than or equal to 1`
    `ernie-serve: error: ERNIE_SERVE_MAX_NUM_SEQS (--max-num-seqs): Input should be ...`
    """
    lines = []
    for err in error.errors(include_url=False):
        loc = err.get("loc") or ()
        field = loc[0] if loc and isinstance(loc[0], str) else None
        if field is None:
            where = ""
        elif field in given:
            where = f"{field_to_flag(field)}: "
        elif field in settings_cls.model_fields:
            where = f"{env_var_name(settings_cls, field)} ({field_to_flag(field)}): "
        else:  # extra="forbid" rejecting an unknown key (from a config file, later)
            where = f"{field}: "
        lines.append(f"{PROG}: error: {where}{err['msg']}")
    return lines
