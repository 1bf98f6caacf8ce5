"""The llguidance grammar backend on the demo tokenizer padded beyond its vocabulary: registered through the hook,
masks that allow exactly what the grammar allows (stop tokens only where it accepts, never ids without text),
matchers independent of each other, and llguidance's own error messages."""

from __future__ import annotations

import json

import pytest
import torch

from ernie_serve.core import plugins
from ernie_serve.demo_tokenizer import padded_demo_tokenizer
from ernie_serve.plugins.llguidance_grammar import LLGuidanceBackend, LLGuidanceMatcher
from ernie_serve.tokenizer import Tokenizer

VOCAB = 2112  # the demo model's: 64 ids past the tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return padded_demo_tokenizer(2048)


@pytest.fixture(scope="module")
def backend(tokenizer: Tokenizer) -> LLGuidanceBackend:
    return LLGuidanceBackend(tokenizer, VOCAB)


def allowed(matcher: LLGuidanceMatcher) -> set[int]:
    row = torch.full((-(-VOCAB // 32),), -1, dtype=torch.int32)
    assert matcher.fill_bitmask(row)
    bits = (row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def feed(matcher: LLGuidanceMatcher, tokenizer: Tokenizer, text: str) -> None:
    for token in tokenizer.encode(text):
        assert token in allowed(matcher), (text, tokenizer.decode_token(token))
        matcher.accept_token(token)


def test_registered_as_the_default_grammar_backend() -> None:
    assert plugins.get_grammar_backend_class("llguidance") is LLGuidanceBackend
    assert plugins.registry().grammar_backends["llguidance"].distribution == "ernie-serve"


def test_choice_masks_follow_the_choices(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    matcher = backend.compile("choice", json.dumps(["yes", "no"])).new_matcher()
    first = allowed(matcher)
    texts = {tokenizer.decode_token(t) for t in first}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert not first & tokenizer.stop_token_ids  # an empty answer is no choice
    feed(matcher, tokenizer, "yes")
    assert matcher.is_finished


def test_stop_tokens_only_where_the_grammar_accepts(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    matcher = backend.compile("regex", "[0-9]{1,3}").new_matcher()
    assert not allowed(matcher) & tokenizer.stop_token_ids
    feed(matcher, tokenizer, "7")
    assert tokenizer.stop_token_ids <= allowed(matcher)  # every stop token, not only eos
    assert not matcher.is_finished
    matcher.accept_token(min(tokenizer.stop_token_ids))
    assert matcher.is_finished


def test_ids_past_the_tokenizer_and_special_tokens_are_never_allowed(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    matcher = backend.compile("regex", "(.|\\n){0,50}").new_matcher()
    mask = allowed(matcher)
    assert max(mask) < tokenizer.vocab_size and len(mask) > 1000
    assert not mask & (set(tokenizer.all_special_ids) - tokenizer.stop_token_ids)


def test_each_sequence_has_its_own_matcher(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]})
    grammar = backend.compile("json", schema)
    one, two = grammar.new_matcher(), grammar.new_matcher()
    feed(one, tokenizer, '{"a":1}')
    assert one.is_finished and not two.is_finished
    feed(two, tokenizer, '{"a":2}')  # unaffected by the first
    assert two.is_finished
    assert not grammar.new_matcher().is_finished  # nor is the compiled grammar


def test_json_has_no_whitespace_between_tokens(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    matcher = backend.compile("json_object", "true").new_matcher()
    feed(matcher, tokenizer, "{")
    assert not any(tokenizer.decode_token(t).isspace() for t in allowed(matcher))


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("json", '{"type": "objectx"}', "objectx"),
        ("json", "[1, 2", "EOF while parsing a list"),
        ("regex", "(a", "unclosed group"),
        ("grammar", "start: missing", "missing"),
    ],
)
def test_errors_carry_llguidance_s_message(backend: LLGuidanceBackend, kind: str, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend.compile(kind, spec)
