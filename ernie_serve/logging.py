"""Logging set-up: structlog for our events, with the standard library's records rendered the same way.

Library modules log either with `structlog.get_logger()` or `logging.getLogger(__name__)`; both end up in
one stderr handler, so stdout stays free for generated text (`ernie-serve generate`) and command output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

import structlog
from tqdm import tqdm

T = TypeVar("T")

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Progress bars are for people: off with `--log-format json`, and whenever stderr is not a terminal.
_progress_allowed = True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (pytest and embedding apps swap it out), instead of
    the stream that happened to be current when logging was configured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


# Extras other libraries attach to their records that mean nothing in our output (uvicorn's ANSI variant of
# each message).
_DROPPED_KEYS = ("color_message",)


def _drop_noise(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _DROPPED_KEYS:
        event.pop(key, None)
    return event


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Called once by the CLI (and by embedding apps that want our format) before any work starts.

    `fmt`: "console" (aligned, colored when stderr is a terminal, for humans) or "json" (one JSON object per
    line, for log pipelines). `level`: a standard level name. Calling it again replaces the earlier set-up.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose {' or '.join(LOG_FORMATS)}")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    numeric_level = getattr(logging, level.upper())

    # Applied to structlog events and to stdlib records alike, so both carry the same keys.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        final: list[Any] = [structlog.processors.dict_tracebacks]
        renderer = structlog.processors.JSONRenderer()
    else:
        final = []
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: loggers created before this call (module-level `get_logger()`) must pick it up.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # `ExtraAdder` turns `logger.warning(..., extra={...})` fields of stdlib records into event keys.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_noise],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.set_name("ernie_serve")

    global _progress_allowed
    _progress_allowed = fmt == "console"

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "ernie_serve"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def ensure_logging() -> None:
    """Called when an engine starts: apply the default set-up unless the application configured structlog
    itself. Unconfigured structlog prints to stdout, which belongs to the caller's own output."""
    if not structlog.is_configured():
        configure_logging()


def show_progress() -> bool:
    """Whether progress bars are shown now: stderr is a terminal and the log format is the console one, so
    logs and pipes stay clean. For bars driven by callbacks (a TensorRT build) rather than by `progress`."""
    return _progress_allowed and sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate `items` with a progress bar on stderr, for long steps a user waits for (building the demo
    model, loading weights, exporting, benchmarks). Shown only when `show_progress()`."""
    yield from tqdm(
        items, desc=description, total=total, unit=unit, disable=not show_progress(), leave=False, file=sys.stderr
    )
