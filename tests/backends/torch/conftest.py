"""Fixtures shared by the torch backend's quantization tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ernie_serve import LLM, SamplingParams

PROMPTS = [[5, 6, 7], list(range(10, 31)), [300, 301]]


@pytest.fixture
def first_tokens_agree() -> Callable[[LLM, LLM, float], None]:
    """`first_tokens_agree(ours, theirs, tolerance)`: on a few prompts, greedy decoding by both models picks the
    same first token, with log-probabilities within `tolerance` nats (later tokens may part at a near tie)."""

    def check(ours_llm: LLM, theirs_llm: LLM, tolerance: float) -> None:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
        for prompt in PROMPTS:
            ours, theirs = (
                llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0] for llm in (ours_llm, theirs_llm)
            )
            first = ours.token_ids[0]
            assert first == theirs.token_ids[0], prompt
            assert ours.logprobs[0][first].logprob == pytest.approx(theirs.logprobs[0][first].logprob, abs=tolerance), (
                prompt
            )

    return check
