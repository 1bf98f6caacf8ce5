"""The built-in grammar backend: llguidance (github.com/guidance-ai/llguidance), a CPU library that turns JSON
schemas, regexes and lark grammars into token masks in tens of microseconds per step. Registered through the
`register_grammar_backends` hook like a third-party plugin's; `--structured-outputs-backend llguidance` (the
default) selects it.

llguidance reads our tokenizer as a table of each token's bytes (`Tokenizer.token_bytes`), so any tokenizer the
engine loads (tokenizer.json or SentencePiece) works. A compiled grammar is an `LLMatcher` at its start that is
never advanced; each sequence gets a copy of it (`deep_copy` shares the compiled grammar and lexer).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import structlog
import torch

from ernie_serve.core.hookspecs import RegisterGrammarBackend, hookimpl
from ernie_serve.core.sampler import LogitsProcessor
from ernie_serve.structured_output import CompiledGrammar, GrammarBackend
from ernie_serve.tokenizer import Tokenizer

log = structlog.get_logger("ernie_serve.structured_output")

# JSON is generated without whitespace between its tokens (`{"a":1}`), as OpenAI's strict mode writes it. With
# whitespace allowed, a weak model (or the demo's random weights) can emit newlines until max_tokens, and the
# answer is no JSON at all.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class _Vocabulary:
    """The tokenizer as llguidance's `TokenizerWrapper` reads it: token bytes, special ids, an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        table = tokenizer.token_bytes()
        # Ids past the tokenizer (a padded embedding) have no bytes, so no grammar can allow them.
        self.tokens = table[:vocab_size] + [b""] * max(0, vocab_size - len(table))
        self.special_token_ids = [i for i in tokenizer.all_special_ids if i < vocab_size]
        self.eos_token_id = min(tokenizer.stop_token_ids, default=tokenizer.eos_token_id)
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


class LLGuidanceMatcher(LogitsProcessor):
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor) -> bool:
        # llguidance writes the row in place (and drops the GIL meanwhile); its width is the model's vocab.
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        return True

    def accept_token(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            # Only a token the mask forbade gets here (min_tokens holding back an eos that was all the grammar
            # allowed): the matcher is in error and stopped, and the sequence ends.
            log.warning("structured output: the grammar refused a sampled token", error=self.matcher.get_error())

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


class LLGuidanceGrammar(CompiledGrammar):
    def __init__(self, template: llguidance.LLMatcher) -> None:
        self.template = template

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.template.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    """JSON schemas (llguidance's supported subset, with `maxLength`, `minimum`, `enum`, ...), regexes, choices
    and lark grammars in llguidance's dialect."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        stop_ids = sorted(i for i in tokenizer.stop_token_ids if i < vocab_size)
        # Every stop token may end a sequence where its grammar accepts, not only eos.
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size))
        self.llg_tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=stop_ids or None)

    def compile(self, kind: str, spec: str) -> LLGuidanceGrammar:
        try:
            grammar = self._grammar(kind, spec)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.llg_tokenizer)
            matcher = None if error else llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        except Exception as exc:  # whatever llguidance raises about a spec is the spec's fault: a 400, not a 500
            raise ValueError(str(exc) or type(exc).__name__) from exc
        if matcher is None or matcher.is_error():
            raise ValueError(error or matcher.get_error())
        return LLGuidanceGrammar(matcher)

    @staticmethod
    def _grammar(kind: str, spec: str) -> str:
        """llguidance's grammar (its JSON form) for a spec."""
        if kind in ("json", "json_object"):
            schema = spec if kind == "json" else '{"type": "object"}'
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":  # one alternative per string, each a quoted lark literal (JSON's escapes)
            literals = (json.dumps(choice, ensure_ascii=False) for choice in json.loads(spec))
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(literals))
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(spec)
        raise ValueError(f"llguidance does not compile {kind!r} specs")


@hookimpl
def register_grammar_backends(register: RegisterGrammarBackend) -> None:
    register("llguidance", LLGuidanceBackend)
