"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Pure functions with no I/O: the gateway encodes with them, and the benchmark client and tests decode with
`SSEDecoder`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
DONE_DATA = "[DONE]"


def encode_data(payload: BaseModel | Mapping[str, Any] | str) -> bytes:
    """One event carrying `payload` (a pydantic model or a mapping, as compact JSON; a string as is).

    A string must not contain a newline: SSE would split it into two `data:` fields."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json().encode()
    elif isinstance(payload, str):
        if "\n" in payload or "\r" in payload:
            raise ValueError("an SSE data line cannot contain a newline")
        body = payload.encode()
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return b"data: " + body + b"\n\n"


class SSEDecoder:
    """Incremental parser: feed bytes as they arrive, get the `data` of each complete event.

    Follows the SSE rules that OpenAI-style streams use: events end at a blank line, `data:` fields of one
    event join with newlines, one space after the colon is dropped, comment lines (`:`) and other fields
    (`event:`, `id:`, `retry:`) are ignored. CRLF, LF and CR line ends are accepted.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._pending_cr = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # a character may straddle two chunks

    def feed(self, chunk: bytes | str) -> Iterator[str]:
        text = self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across two chunks
        self._pending_cr = text.endswith("\r")
        self._buffer += text
        *lines, self._buffer = self._buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            event = self._line(line)
            if event is not None:
                yield event

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


def decode_stream(chunks: list[bytes] | list[str]) -> list[str]:
    """Every event's data in a whole stream (for tests and simple clients)."""
    decoder = SSEDecoder()
    return [data for chunk in chunks for data in decoder.feed(chunk)]
