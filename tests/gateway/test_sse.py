"""SSE encoding and decoding, pure functions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ernie_serve.gateway.protocol import UsageInfo
from ernie_serve.gateway.sse import DONE, DONE_DATA, SSEDecoder, decode_stream, encode_data


def test_encode_mapping_is_one_compact_data_line() -> None:
    assert encode_data({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()


def test_encode_model_and_string() -> None:
    assert (
        encode_data(UsageInfo(prompt_tokens=1))
        == b'data: {"prompt_tokens":1,"completion_tokens":0,"total_tokens":0}\n\n'
    )
    assert encode_data(DONE_DATA) == DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("text", ["two\nlines", "two\rlines"])
def test_encode_refuses_a_newline_in_a_string(text: str) -> None:
    with pytest.raises(ValueError, match="^an SSE data line cannot contain a newline$"):
        encode_data(text)


def test_json_with_newlines_in_values_stays_on_one_line() -> None:
    event = encode_data({"text": "a\nb\r\n"})
    assert event.count(b"\n") == 2 and event.endswith(b"\n\n")
    assert json.loads(decode_stream([event])[0]) == {"text": "a\nb\r\n"}


def test_decoder_rules() -> None:
    stream = [b": keep-alive comment\n", b"event: x\nid: 3\ndata: one\ndata:two\n\n", b"data: [DONE]\r\n\r\n"]
    assert decode_stream(stream) == ["one\ntwo", "[DONE]"]


def test_decoder_handles_crlf_split_across_chunks() -> None:
    assert decode_stream([b"data: a\r", b"\n\r", b"\n"]) == ["a"]


def test_decoder_handles_a_character_split_across_chunks() -> None:
    raw = encode_data({"t": "周杰伦"})
    cut = raw.index("杰".encode()) + 1
    assert json.loads(decode_stream([raw[:cut], raw[cut:]])[0]) == {"t": "周杰伦"}


@given(
    payloads=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_chunking_decodes_to_the_same_events(payloads: list[dict[str, str]], cuts: list[int]) -> None:
    raw = b"".join(encode_data(p) for p in payloads) + DONE
    bounds = sorted({c for c in cuts if c < len(raw)} | {0, len(raw)})
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    decoder = SSEDecoder()
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    assert events == [json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in payloads] + ["[DONE]"]
