"""Stop strings that are guaranteed to span two tokens, for tests of stop-string handling.

A stop string made of one token's text never exercises the hard case: text held back at the end of one step
because it might begin a stop string, settled by the next token. `spanning_stop` picks, from an output that
was already generated, a two-character stop string whose first character ends one token's text and whose
second begins the next token's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class SpanningStop:
    stop: str  # two characters
    start: int  # where it begins in the text: the text is cut there
    last_token: int  # index of the token that completes it (the one after the boundary)


def spanning_stop(tokenizer: _Decoder, token_ids: Sequence[int], from_token: int = 1) -> SpanningStop:
    """The first token boundary at or after `from_token` where the last character of the text so far and the
    first character the next token adds form a string that does not occur earlier in the text."""
    text = tokenizer.decode(list(token_ids))
    for index in range(max(from_token, 1), len(token_ids)):
        before = tokenizer.decode(list(token_ids[:index]))
        after = tokenizer.decode(list(token_ids[: index + 1]))
        if not before or not text.startswith(after) or len(after) <= len(before):
            continue  # the boundary falls inside a character: the text so far is not yet final
        stop = before[-1] + after[len(before)]
        if stop.strip() and "\ufffd" not in stop and text.find(stop) == len(before) - 1:
            return SpanningStop(stop, len(before) - 1, index)
    raise ValueError("no token boundary in this output makes a spanning stop string; generate more tokens")
