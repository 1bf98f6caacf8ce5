"""The one output path (engine core -> output processor -> `LLM`): stop strings, held-back text, finish
reasons, closing. Stop strings here always span two tokens (`ernie_serve.testing.stops`)."""

from __future__ import annotations

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.core.sampling_params import SEED_MAX, SamplingParamsError
from ernie_serve.testing.stops import spanning_stop

PROMPT = "stop strings"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    with LLM(model=str(tiny_checkpoint("moe_shared_tied", torch.float32)), block_size=4) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(llm: LLM):
    """The greedy output without stop strings, and a stop string spanning its tokens 4 and 5 or later."""
    output = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    return output, spanning_stop(llm.get_tokenizer(), output.token_ids, from_token=4)


def test_stop_string_on_the_last_allowed_token_is_a_stop(llm: LLM, reference) -> None:
    output, span = reference
    params = SamplingParams(temperature=0, max_tokens=span.last_token + 1, ignore_eos=True, stop=[span.stop])
    completion = llm.generate(PROMPT, params)[0].outputs[0]
    assert completion.token_ids == output.token_ids[: span.last_token + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", span.stop)
    assert completion.text == output.text[: span.start]


def test_stream_never_sends_text_the_final_output_lacks(llm: LLM, reference) -> None:
    output, span = reference
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[span.stop])
    final = llm.generate(PROMPT, params)[0].outputs[0]
    assert final.text == output.text[: span.start] and final.stop_reason == span.stop
    # Before the stop string's second character arrived, its first one ended the text: it was held back,
    # so the deltas add up to the final text and not one character more.
    assert "".join(llm.stream(PROMPT, params)) == final.text


def test_stream_matches_generate_with_include_stop_str(llm: LLM, reference) -> None:
    _, span = reference
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[span.stop], include_stop_str_in_output=True
    )
    final = llm.generate(PROMPT, params)[0].outputs[0]
    assert final.text.endswith(span.stop)
    assert "".join(llm.stream(PROMPT, params)) == final.text


def test_engine_outputs_only_grow(llm: LLM, reference) -> None:
    """Every cumulative output's text is a prefix of the final text (what every stream relies on)."""
    _, span = reference
    engine = llm.engine
    request_id = engine.add_request(
        engine.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[span.stop])
    )
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step() if o.request_id == request_id]
    assert len(texts) >= span.last_token
    assert all(texts[-1].startswith(t) for t in texts)


def test_abort_reports_abort_once(llm: LLM) -> None:
    engine = llm.engine
    request_id = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, n=2))
    first = engine.step()
    assert [o.request_id for o in first] == [request_id] and not first[0].finished
    engine.abort_request(request_id)
    assert engine.has_unfinished_requests()  # the abort is still to be reported
    final = engine.step()
    assert [o.request_id for o in final] == [request_id] and final[0].finished
    assert [c.finish_reason for c in final[0].outputs] == ["abort", "abort"]
    assert final[0].metrics is not None and final[0].metrics["num_generation_tokens"] == 2
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_invalid_token_ids_and_seed_are_refused_by_field(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    for field, prompt, params in [
        ("stop_token_ids", [5], SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[-5000])),
        ("stop_token_ids", [5], SamplingParams(max_tokens=4, stop_token_ids=[vocab])),
        ("prompt", [vocab + 3], SamplingParams(max_tokens=4)),
    ]:
        with pytest.raises(SamplingParamsError) as info:
            llm.generate({"prompt_token_ids": prompt}, params)
        assert info.value.param == field
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(seed=SEED_MAX + 1)
    assert info.value.param == "seed"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(prompt_logprobs=1)
    assert info.value.param == "prompt_logprobs"
    assert not llm.engine.has_unfinished_requests()


def test_largest_seed_with_n(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=SEED_MAX, n=3, max_tokens=4, ignore_eos=True)
    first = llm.generate(PROMPT, params)[0]
    again = llm.generate(PROMPT, params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert all(len(c.token_ids) == 4 for c in first.outputs)


def test_close_releases_the_backend(tiny_checkpoint) -> None:
    closed = []
    with LLM(model=str(tiny_checkpoint("moe_shared_tied", torch.float32)), block_size=4) as llm:
        backend = llm.engine.core.backend
        original = backend.close
        backend.close = lambda: (closed.append(True), original())  # type: ignore[method-assign]
        assert llm.generate("x", SamplingParams(max_tokens=2))[0].finished
    assert closed == [True]
