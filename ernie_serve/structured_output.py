"""Structured output in the frontend: `StructuredOutputsParams` compiled into grammars, whose matchers constrain
sampling.

A grammar backend is a plugin (`register_grammar_backends`; the built-in one is llguidance, in
`ernie_serve/plugins/llguidance_grammar.py`); `--structured-outputs-backend` picks one per engine. Who does what,
and on which thread:
- compiling a spec (`GrammarBackend.compile`) takes from microseconds to a second for a large schema, so the async
  engine does it on a worker thread before it hands the request to the engine thread, never on the event loop;
  `LLM.generate` compiles a call's distinct specs on a thread pool. Grammars are cached per (kind, spec), so a
  schema sent with every request is compiled once;
- matching runs on the engine thread: each sequence gets its own matcher (`CompiledGrammar.new_matcher`, a
  `LogitsProcessor`), which the sampler asks for a token bitmask every step and tells every token it sampled.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable

import torch

from ernie_serve.core.plugins import get_grammar_backend_class
from ernie_serve.core.sampler import LogitsProcessor
from ernie_serve.core.sampling_params import SamplingParamsError, StructuredOutputsParams
from ernie_serve.tokenizer import Tokenizer

# Compiled grammars kept per engine. A JSON-schema grammar holds its lexer's states, tens of kB to a few MB.
GRAMMAR_CACHE_SIZE = 256


def allow_only(bitmask: torch.Tensor, token_ids: Iterable[int]) -> None:
    """Overwrite a `fill_bitmask` row so that only `token_ids` are allowed (to force one token, or a few)."""
    words: dict[int, int] = {}
    for token in token_ids:
        words[token >> 5] = words.get(token >> 5, 0) | 1 << (token & 31)
    bitmask.zero_()
    for word, bits in words.items():
        bitmask[word] = bits - (1 << 32) if bits >> 31 else bits  # int32 keeps bit 31 as the sign


class GrammarCompileError(SamplingParamsError):
    """A structured-output spec the grammar backend cannot compile; the message is the backend's (a 400)."""

    def __init__(self, message: str) -> None:
        super().__init__("structured_outputs", message)


class CompiledGrammar(ABC):
    """One compiled spec, shared by every sequence that uses it (and kept in the cache): it must not change."""

    @abstractmethod
    def new_matcher(self) -> LogitsProcessor:
        """Called on the engine thread once per sequence, when the engine adds it: a matcher at the grammar's
        start. Must be cheap (a copy of a compiled state, not a compilation)."""


class GrammarBackend(ABC):
    """Compiles structured-output specs for one tokenizer. Subclass it and register the class with the
    `register_grammar_backends` hook; `--structured-outputs-backend NAME` selects it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        """Called once per engine, on a worker thread, by the first request that asks for structured output:
        build the token tables here. `vocab_size` is the model's logits width (it may exceed the tokenizer's:
        such ids have no text, and no grammar allows them); `tokenizer.stop_token_ids` are the tokens that may
        end a sequence where its grammar accepts."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @abstractmethod
    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Called on a worker thread for a spec not in the cache; several may run at once. `kind` is "json" (spec:
        the schema's JSON text), "regex", "choice" (a JSON list of strings), "grammar" (lark) or "json_object"
        (spec "true"). Raise `ValueError` with the engine's own words when the spec cannot be compiled."""


class StructuredOutputs:
    """The engine's grammar backend and its cache of compiled grammars. Thread-safe: the async engine compiles on
    worker threads while the engine thread makes matchers."""

    def __init__(self, backend_name: str, tokenizer: Tokenizer, vocab_size: int) -> None:
        """Called when the engine starts; an unknown backend name is an `UnknownPluginError` there and then."""
        self._backend_cls = get_grammar_backend_class(backend_name)
        if not (isinstance(self._backend_cls, type) and issubclass(self._backend_cls, GrammarBackend)):
            raise TypeError(f"grammar backend {backend_name!r} is not a GrammarBackend subclass")
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._backend: GrammarBackend | None = None  # built by the first structured request
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of `params`, from the cache or compiled now (in the calling thread: callers keep
        it off the event loop and the engine thread). Raises `GrammarCompileError`."""
        key = params.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._backend is None:
                self._backend = self._backend_cls(self._tokenizer, self._vocab_size)
            backend = self._backend
        try:
            grammar = backend.compile(*key)  # outside the lock: compilations run in parallel
        except ValueError as exc:
            raise GrammarCompileError(f"structured_outputs.{key[0]} cannot be compiled: {exc}") from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar
