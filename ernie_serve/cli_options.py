"""Command-line flags generated from pydantic-settings models, and one-line error messages naming them.

Shared by every CLI subcommand that builds settings (`generate`, `serve`), so a new settings
field is a new flag everywhere with no CLI change. Precedence: an explicit flag, then the `ERNIE_SERVE_*`
environment variable, then the field default; that falls out of passing only the flags the user gave.

Backends declare their own options (`Backend.options_class`): every registered backend's fields become flags
too, in a group per backend. The ones the user gave go into `EngineSettings.backend_options`; the selected
backend's options class reads its environment variables itself.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from ernie_serve.core.errors import UserError
from ernie_serve.core.plugins import registry

if TYPE_CHECKING:
    from ernie_serve.core.backend import Backend

PROG = "ernie-serve"


class FlagClashError(UserError, ValueError):
    """Two registered backends' options, or a backend option and one of the command's own, want one flag."""


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


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


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
        if name in skip or _is_dict(info.annotation):  # `backend_options`: its entries are flags of their own
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


def _flags(settings_cls: type[BaseSettings], name: str) -> list[str]:
    """The option strings a field's flag takes (`--x`, and `--no-x` for booleans)."""
    flag = field_to_flag(name)
    if _is_bool(settings_cls.model_fields[name].annotation):
        return [flag, "--no-" + flag[2:]]
    return [flag]


def registered_backends() -> dict[str, type[Backend]]:
    """Every registered backend class by name (this builds the plugin registry)."""
    return {name: registration.obj for name, registration in registry().backends.items()}


def add_backend_arguments(
    parser: argparse.ArgumentParser,
    reserved: Mapping[str, type[BaseSettings]],
    backends: Mapping[str, type[Backend]] | None = None,
) -> None:
    """Called while building `serve`'s and `generate`'s parsers, after their own flags: one group per backend
    with options, one flag per field of its `options_class`. Backends sharing an options class (a subclass of
    a built-in backend) share its flags.

    `reserved` names the settings classes whose flags the command already has ("engine option":
    EngineSettings, ...). Raises `FlagClashError` naming both owners when a backend option's flag is one of
    those, another backend's, or any other flag of the command."""
    backends = registered_backends() if backends is None else backends
    owners: dict[str, str] = {}  # option string -> who declared it, for the message
    for label, settings_cls in reserved.items():
        for name in settings_cls.model_fields:
            for flag in _flags(settings_cls, name):
                owners[flag] = f"the {label} {field_to_flag(name)}"
    added: set[type[BaseSettings]] = set()
    for backend_name, backend_cls in backends.items():
        options_cls = backend_cls.options_class
        if options_cls in added or not options_cls.model_fields:
            continue
        added.add(options_cls)
        owner = f"an option of backend {backend_name!r} ({options_cls.__module__}.{options_cls.__qualname__})"
        for name in options_cls.model_fields:
            for flag in _flags(options_cls, name):
                if flag in owners:
                    raise FlagClashError(f"flag {flag} is declared twice: by {owners[flag]} and by {owner}")
                owners[flag] = owner
        group = parser.add_argument_group(f"{backend_name} backend options")
        try:
            add_settings_arguments(group, options_cls)
        except argparse.ArgumentError as clash:  # a flag of the command itself (e.g. a sampling flag)
            raise FlagClashError(f"{owner} clashes with a flag of `{parser.prog}`: {clash}") from None


def given_backend_options(
    namespace: argparse.Namespace, backends: Mapping[str, type[Backend]] | None = None
) -> dict[str, Any]:
    """The backend options the user gave as flags, for `EngineSettings.backend_options` (whichever backend
    they belong to: `backend_option_errors` checks them against the selected one)."""
    backends = registered_backends() if backends is None else backends
    given: dict[str, Any] = {}
    for backend_cls in backends.values():
        given.update(given_settings(namespace, backend_cls.options_class))
    return given


def backend_option_errors(
    backend_name: str, given: Mapping[str, Any], backends: Mapping[str, type[Backend]] | None = None
) -> list[str]:
    """Called once the backend is known: one error line per given option the selected backend does not take
    (it belongs to another backend), or per value its options class rejects, flags or env vars named as
    `format_validation_error` does. An unknown backend name gives none here: the engine reports it."""
    backends = registered_backends() if backends is None else backends
    backend_cls = backends.get(backend_name)
    if backend_cls is None:
        return []
    options_cls = backend_cls.options_class
    lines = []
    for name in given:
        if name not in options_cls.model_fields:
            owners = [n for n, cls in backends.items() if name in cls.options_class.model_fields]
            whose = f"backend {', '.join(map(repr, owners))}" if owners else "no backend"
            lines.append(f"{PROG}: error: {field_to_flag(name)} is an option of {whose}, not of {backend_name!r}")
    if lines:
        return lines
    try:
        options_cls(**given)
    except ValidationError as exc:
        return format_validation_error(exc, options_cls, given)
    return []


def given_settings(namespace: argparse.Namespace, settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The settings fields the user gave as flags (not None) in a parsed namespace. For a settings class with
    a `backend_options` field (EngineSettings), the backend option flags given go there."""
    values = vars(namespace)
    given = {name: values[name] for name in settings_cls.model_fields if name in values and values[name] is not None}
    if "backend_options" in settings_cls.model_fields and (options := given_backend_options(namespace)):
        given["backend_options"] = options
    return given


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
