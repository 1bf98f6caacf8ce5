"""Incremental detokenization with stop strings: token ids in, streamable text deltas out.

One `IncrementalDetokenizer` per completion, owned by the output processor: it calls `add_tokens` with each
step's new ids (it returns the stop string when one is hit, and the request is then finished), and `finish`
when the request ends for any other reason (eos, length, abort). `output_text` is the one rule for what may
be shown: while the request runs it leaves out characters that could still begin a stop string, so text
that was shown is never taken back; every stream sends the growth of `output_text` and nothing else.

Decoding uses vLLM's prefix/read offsets: each step decodes only a short window (the tokens read last step,
for context, plus the new ones) twice and keeps the difference, so the cost per token does not grow with the
output. Text is released only in whole characters: byte-level tokens can split a UTF-8 character, and a
window whose text ends in U+FFFD waits for the rest of the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ernie_serve.tokenizer import Tokenizer

# What a tokenizer prints for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context for the first output tokens (vLLM's initial offset): SentencePiece drops
# the space of a window's first piece, so without context " Paris" after "The capital is" came out "Paris".
_PROMPT_CONTEXT_TOKENS = 5


def _drop_last(pieces: list[str], n: int) -> None:
    """Remove the last `n` characters from text kept as a list of pieces."""
    while n > 0:
        last = pieces.pop()
        if len(last) > n:
            pieces.append(last[:-n])
        n -= len(last)


class IncrementalDetokenizer:
    """Turns one completion's token ids into text, cutting it at the first stop string.

    The text equals `tokenizer.decode(output_ids, skip_special_tokens)` up to the stop cut, except that the
    last prompt tokens serve as decoding context: with a SentencePiece tokenizer a leading space of the first
    output token is kept (as vLLM does). Pass `prompt_token_ids=[]` for exactly `decode(output_ids)`.

    When several stop strings occur, the one completed first in the text wins (on a tie, the longer one), so
    the result does not depend on how the ids were batched into `add_tokens` calls.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = list(dict.fromkeys(s for s in stop if s))
        self._include_stop = include_stop_str_in_output
        # A stop string completed by new text starts at most this many characters before it.
        self._tail_len = max(map(len, self._stops), default=1) - 1

        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends inside a character: context would misalign the first diff, so go without.
            context = []
        self._ids = context  # only the window still needed: ids[prefix_offset:] (older ids are dropped)
        self._prefix_offset = 0  # start of the context window
        self._read_offset = len(context)  # end of the text already turned into characters

        self._pieces: list[str] = []  # the whole text so far, in pieces (joined when output_text is read)
        self._tail = ""  # its last `_tail_len` characters, where a stop string may begin
        self._hold = 0  # characters at the end that could be the start of a stop string
        self._shown = 0  # length of the longest output_text returned: a stop cut may never go below it
        self._finished = False
        self.stop_reason: str | None = None  # the stop string that ended the text, if any

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add_tokens(self, new_token_ids: Sequence[int]) -> str | None:
        """Feed a step's new ids; called once per step for every running completion.

        Returns the stop string when the text now contains one (the engine finishes the request with
        finish_reason "stop"), else None. After a stop or `finish`, further ids are ignored.
        """
        if self._finished or self.stop_reason is not None:
            return self.stop_reason
        self._ids.extend(new_token_ids)
        return self._append(self._read(flush=False))

    def finish(self) -> None:
        """Called when the request ends without a stop string: bytes of an unfinished character are released
        as U+FFFD (as `decode` prints them) and `output_text` stops holding anything back."""
        if not self._finished and self.stop_reason is None:
            self._append(self._read(flush=True))
        self._finished = True

    @property
    def output_text(self) -> str:
        """The text so far, stop string cut (unless included). While the request runs, the characters at the
        end that could still begin a stop string are left out until the next tokens settle them; after a stop
        or `finish` it is the whole text. It only ever grows. Costs a join over the text."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        text = self._pieces[0] if self._pieces else ""
        if not self._finished and self.stop_reason is None and self._hold:
            text = text[: len(text) - self._hold]
        self._shown = len(text)
        return text

    def _read(self, flush: bool) -> str:
        """Decode the window and return the characters the new ids add (vLLM's detokenize_incrementally)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if new_text.endswith(_REPLACEMENT) and not flush:
            return ""  # a character's bytes are still arriving; the window grows until it is whole
        # The next window's context is what this step read; ids before it are no longer needed.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def _append(self, delta: str) -> str | None:
        """Add decoded characters, cutting at a stop string that they complete."""
        if not delta:
            return None
        window = self._tail + delta
        hit: tuple[int, int, str] | None = None  # (end, start, stop string) within window
        for s in self._stops:
            # The earlier text holds no stop string, so any match here ends inside `delta`.
            start = window.find(s)
            if start != -1 and (hit is None or (start + len(s), -len(s)) < (hit[0], -len(hit[2]))):
                hit = (start + len(s), start, s)
        if hit is not None:
            end, start, self.stop_reason = hit
            cut = (end if self._include_stop else start) - len(self._tail)  # relative to delta
            if cut >= 0:
                self._pieces.append(delta[:cut])
            else:
                # The stop string began in earlier text; that text was held back, so it was never shown.
                _drop_last(self._pieces, -cut)
                assert sum(map(len, self._pieces)) >= self._shown, "stop-string start was already shown"
            return self.stop_reason
        self._pieces.append(delta)
        self._tail = window[-self._tail_len :] if self._tail_len else ""
        self._hold = self._stop_prefix_len(window)
        return None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold
