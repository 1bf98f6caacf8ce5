"""The benchmark workloads: reproducible, in range, and the word tokenizer used for HTTP benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ernie_serve.bench.workload import FIRST_ORDINARY_TOKEN, mixed_workload, random_requests, write_word_tokenizer
from ernie_serve.tokenizer import Tokenizer


def test_random_requests_are_reproducible_and_in_range() -> None:
    requests = random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=3)
    assert requests == random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=3)
    assert requests != random_requests(20, 30, 10, range_ratio=0.5, vocab_size=50, seed=4)
    assert all(15 <= len(r.prompt_token_ids) <= 45 and 5 <= r.output_len <= 15 for r in requests)
    assert all(FIRST_ORDINARY_TOKEN <= t < 50 for r in requests for t in r.prompt_token_ids)
    fixed = random_requests(3, 8, 4)
    assert [len(r.prompt_token_ids) for r in fixed] == [8, 8, 8] and [r.output_len for r in fixed] == [4, 4, 4]
    with pytest.raises(ValueError, match="--random-range-ratio"):
        random_requests(1, 8, 4, range_ratio=1.0)
    with pytest.raises(ValueError, match="--random-vocab-size"):
        random_requests(1, 8, 4, vocab_size=FIRST_ORDINARY_TOKEN)


def test_mixed_workload_spans_its_ranges() -> None:
    workload = mixed_workload(num_requests=200, vocab=100, seed=5)
    assert workload == mixed_workload(num_requests=200, vocab=100, seed=5)
    prompts = [len(r.prompt_token_ids) for r in workload]
    outputs = [r.output_len for r in workload]
    assert 16 <= min(prompts) < 40 and 230 < max(prompts) <= 256
    assert 16 <= min(outputs) < 30 and 115 < max(outputs) <= 128
    assert all(FIRST_ORDINARY_TOKEN <= t < 100 for r in workload for t in r.prompt_token_ids)


def test_word_tokenizer_streams_text_for_every_id(tmp_path: Path) -> None:
    write_word_tokenizer(tmp_path, 300)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 300
    assert tokenizer.decode([11, 293, 2, 4]) == "w11 w293"  # special tokens skipped
    assert [tokenizer.token_to_id(t) for t in ("<think>", "</tool_call>")] == [294, 299]  # ERNIE's tags, last
    assert tokenizer.stop_token_ids == {2, 4}
