"""Incremental detokenization: deltas add up to `decode`, whole characters only, stop strings cut exactly."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from ernie_serve.demo_tokenizer import build_demo_tokenizer, demo_corpus
from ernie_serve.detokenizer import IncrementalDetokenizer
from ernie_serve.tokenizer import Tokenizer

TEXTS = [
    "Hello world, how are you today?",
    "你好，世界！今天我们学习增量解码。",
    "Emoji 😀🎉👍🏽🇨🇳 and 👩\u200d💻 between words, 中文😀混合",
    "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ 𓀀 — dashes “quotes” …",
    "def f(x):\n    return x ** 2  # 平方\n\n\tdone",
    "  spaces   everywhere  ",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("demo-tokenizer")
    build_demo_tokenizer(out)
    return Tokenizer.from_pretrained(out)


def stream(
    tok: Tokenizer,
    chunks: Sequence[Sequence[int]],
    stop: Sequence[str] = (),
    prompt: Sequence[int] = (),
    **kwargs: bool,
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed `chunks` like engine steps, taking the growth of `output_text` after each as a stream would;
    returns (deltas, stop hit, detok). Asserts that shown text is never taken back."""
    detok = IncrementalDetokenizer(tok, list(prompt), list(stop), **kwargs)
    deltas: list[str] = []
    shown = ""
    hit = None

    def take() -> None:
        nonlocal shown
        text = detok.output_text
        assert text.startswith(shown), (shown, text)
        deltas.append(text[len(shown) :])
        shown = text

    for chunk in chunks:
        hit = detok.add_tokens(list(chunk))
        take()
        if hit is not None:
            break
    if hit is None:
        detok.finish()
    take()
    return deltas, hit, detok


def one_by_one(ids: Sequence[int]) -> list[list[int]]:
    return [[i] for i in ids]


# -- text equals decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas, hit, detok = stream(tok, one_by_one(ids))
    assert hit is None
    assert "".join(deltas) == detok.output_text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_every_split_point(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for k in range(len(ids) + 1):
        deltas, _, _ = stream(tok, [ids[:k], ids[k:]])
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_split_character_appears_once_complete(tok: Tokenizer) -> None:
    ids = tok.encode("a😀b")
    # The emoji is not in the tiny vocabulary: its 4 bytes come as tokens that are not characters alone.
    assert any(tok.decode([i]) == "\ufffd" for i in ids)
    deltas, _, _ = stream(tok, one_by_one(ids))
    assert [d for d in deltas if d] == ["a", "😀", "b"]


def test_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("User: 翻译\nAssistant: ")
    out = tok.encode("Bonjour 😀 le monde")
    deltas, _, _ = stream(tok, one_by_one(out), prompt=prompt)
    assert "".join(deltas) == tok.decode(out)
    # A prompt cut inside a character must not shift the first output text.
    half = tok.encode("😀")[:1]
    deltas, _, _ = stream(tok, one_by_one(out), prompt=prompt + half)
    assert "".join(deltas) == tok.decode(out)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Tokenizer, skip: bool) -> None:
    ids = [3, *tok.encode("User: hi\n"), 4, 4, 4, *tok.encode("你好"), 2]
    deltas, _, detok = stream(tok, one_by_one(ids), skip_special_tokens=skip)
    assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=skip)


def test_markup_tokens_stream_as_text(tok: Tokenizer) -> None:
    text = "reason\n</think>\n\n<response>\nanswer\n</response>\n"
    ids = [*tok.encode(text), 4]  # the turn ends with <|end_of_sentence|>, which is skipped
    assert sum(i in tok.all_special_ids for i in ids) == 4  # the tags are single special tokens
    deltas, _, detok = stream(tok, one_by_one(ids))
    assert "".join(deltas) == detok.output_text == text


def test_random_ids_match_decode(tok: Tokenizer) -> None:
    """Arbitrary ids (broken byte sequences, specials, ids past the vocabulary) in arbitrary batches."""
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size + 20) for _ in range(rng.randrange(1, 30))]
        chunks, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 5)
            chunks.append(ids[i : i + n])
            i += n
        skip = rng.random() < 0.5
        deltas, _, detok = stream(tok, chunks, skip_special_tokens=skip)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == detok.output_text == expected, ids
        if "\ufffd" not in expected:
            assert not any("\ufffd" in d for d in deltas)


class CountingTokenizer:
    """Counts how many ids the detokenizer asks to decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens)


def test_cost_per_token_is_constant(tok: Tokenizer) -> None:
    ids = tok.encode(demo_corpus()[:6000])
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, [], [])  # type: ignore[arg-type]
    for i in ids:
        detok.add_tokens([i])
    detok.finish()
    assert detok.output_text == tok.decode(ids)
    assert counting.decoded < 12 * len(ids)  # windows of a few tokens, never the whole text


# -- stop strings ---------------------------------------------------------------------------------------


def test_stop_string_cut_exactly(tok: Tokenizer) -> None:
    text = "Hello world, how are you today?"
    deltas, hit, detok = stream(tok, one_by_one(tok.encode(text)), stop=["how"])
    assert hit == detok.stop_reason == "how"
    assert "".join(deltas) == detok.output_text == "Hello world, "


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    text = "Hello world, how are you today?"
    ids = tok.encode(text)
    stop = "lo wor"
    # The stop string is not one token: it starts inside one and ends inside another.
    assert all(stop not in tok.decode([i]) for i in ids)
    for k in range(len(ids) + 1):
        deltas, hit, detok = stream(tok, [ids[:k], ids[k:]], stop=[stop])
        assert hit == stop
        assert "".join(deltas) == detok.output_text == "Hel"
    deltas, hit, _ = stream(tok, one_by_one(ids), stop=[stop], include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello wor"


def test_stop_string_inside_multibyte_text(tok: Tokenizer) -> None:
    text = "今天天气很好😀，我们去公园散步吧"
    ids = tok.encode(text)
    deltas, hit, _ = stream(tok, one_by_one(ids), stop=["😀，我"])
    assert hit == "😀，我" and "".join(deltas) == "今天天气很好"
    deltas, _, _ = stream(tok, one_by_one(ids), stop=["😀，我"], include_stop_str_in_output=True)
    assert "".join(deltas) == "今天天气很好😀，我"


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, how are you today?")
    deltas, hit, detok = stream(tok, one_by_one(ids), stop=["how"], include_stop_str_in_output=True)
    assert hit == "how"
    assert "".join(deltas) == detok.output_text == "Hello world, how"


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, how are you today?")
    for chunks in (one_by_one(ids), [ids]):
        deltas, hit, _ = stream(tok, chunks, stop=["today", "are", "how are"])
        assert hit == "how are" and "".join(deltas) == "Hello world, "
    # Nested matches: the stop string completed first wins, however the ids were batched.
    for chunks in (one_by_one(ids), [ids]):
        deltas, hit, _ = stream(tok, chunks, stop=["world, how are", "ld,"])
        assert hit == "ld," and "".join(deltas) == "Hello wor"


def test_diverging_stop_prefix_is_released(tok: Tokenizer) -> None:
    text = "Hello world, how are you today?"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], ["world peace"])
    decoded = ""
    for i in ids:
        assert detok.add_tokens([i]) is None
        decoded += tok.decode([i])
        # Text that could still become "world peace" is held back, nothing else.
        if decoded.endswith("world"):
            assert detok.output_text == "Hello "
        if decoded.endswith(","):
            assert detok.output_text == decoded
    detok.finish()
    assert detok.output_text == text


def test_held_stop_prefix_released_at_finish(tok: Tokenizer) -> None:
    ids = tok.encode("the end is nea")
    deltas, hit, detok = stream(tok, one_by_one(ids), stop=["near"])
    assert hit is None and "".join(deltas) == detok.output_text == "the end is nea"
    assert not deltas[-2].endswith("nea")  # held while running, released by finish


def test_stop_after_split_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀 STOP more")
    deltas, hit, _ = stream(tok, one_by_one(ids), stop=["STOP"])
    assert hit == "STOP" and "".join(deltas) == "ok 😀 "
    assert not any("\ufffd" in d for d in deltas)


def test_tokens_after_stop_are_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], ["b"])
    assert detok.add_tokens(tok.encode("a b c")) == "b"
    assert detok.output_text == "a "
    assert detok.add_tokens(tok.encode(" more")) == "b"
    detok.finish()
    assert detok.output_text == "a "


def test_empty_and_duplicate_stop_strings(tok: Tokenizer) -> None:
    ids = tok.encode("abc abc")
    deltas, hit, _ = stream(tok, one_by_one(ids), stop=["", "c a", "c a"])
    assert hit == "c a" and "".join(deltas) == "ab"


def test_random_stop_strings_match_reference(tok: Tokenizer) -> None:
    """Against a direct computation on the full text: first completed match, earliest start on ties."""
    rng = random.Random(7)
    corpus = demo_corpus()
    for _ in range(150):
        start = rng.randrange(len(corpus) - 200)
        text = corpus[start : start + rng.randrange(20, 200)]
        stops = []
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(len(text))
            stops.append(text[a : a + rng.randrange(1, 8)] if rng.random() < 0.8 else "zzz")
        include = rng.random() < 0.5
        ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s and s in text]
        if ends:
            end, neg_len, s = min(ends)
            expected, expected_hit = text[: end if include else end + neg_len], s
        else:
            expected, expected_hit = text, None
        ids = tok.encode(text)
        deltas, hit, detok = stream(tok, one_by_one(ids), stop=stops, include_stop_str_in_output=include)
        assert (hit, "".join(deltas), detok.output_text) == (expected_hit, expected, expected), (text, stops)


# -- SentencePiece --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    spm = pytest.importorskip("sentencepiece")
    out: Path = tmp_path_factory.mktemp("sp-tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus().splitlines()),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        control_symbols=["<|begin_of_sentence|>", "<|end_of_sentence|>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return Tokenizer.from_pretrained(out)


@pytest.mark.parametrize("text", TEXTS[:5])
def test_sentencepiece_one_token_at_a_time(sp_tok: Tokenizer, text: str) -> None:
    ids = sp_tok.encode(text)
    deltas, _, detok = stream(sp_tok, one_by_one(ids))
    assert "".join(deltas) == detok.output_text == sp_tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_keeps_space_after_prompt(sp_tok: Tokenizer) -> None:
    prompt = sp_tok.encode("The capital of France is")
    out = sp_tok.encode("The capital of France is Paris")[len(prompt) :]
    assert sp_tok.decode(out) == "Paris"  # decoding alone drops the piece's leading space
    deltas, _, _ = stream(sp_tok, one_by_one(out), prompt=prompt)
    assert "".join(deltas) == " Paris"
