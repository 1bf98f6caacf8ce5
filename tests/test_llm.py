"""The offline API as a user calls it, on the demo model and a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.core.sampling_params import SamplingParamsError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=str(tiny_checkpoint("moe_shared_tied", torch.bfloat16)), block_size=4)


def test_prompt_forms_and_input_order(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    single = llm.generate("hello world", greedy)
    assert len(single) == 1 and len(single[0].outputs[0].token_ids) == 5
    tokenized = llm.get_tokenizer().encode("hello world")
    as_ids = llm.generate([{"prompt_token_ids": tokenized}], greedy)
    assert as_ids[0].outputs[0].token_ids == single[0].outputs[0].token_ids
    assert single[0].prompt_token_ids == tokenized

    prompts = ["a", "a much longer prompt than the first one, to finish later", "b c"]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (7, 2, 4)]
    outputs = llm.generate(prompts, params)
    assert [o.prompt for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [7, 2, 4]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    text = outputs[0].outputs[0].text
    assert text == llm.get_tokenizer().decode(outputs[0].outputs[0].token_ids)


def test_batched_equals_alone(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["one", "two three four", "five six"]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    alone = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_seed_n_and_logprobs(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, n=3, ignore_eos=True, logprobs=2)
    first = llm.generate("sampling", params)[0]
    second = llm.generate(["other prompt", "sampling"], [SamplingParams(temperature=1.0, max_tokens=3), params])[1]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len(first.outputs) == 3 and [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # children draw different seeds
    completion = first.outputs[0]
    assert len(completion.logprobs) == 8
    for entry, token in zip(completion.logprobs, completion.token_ids, strict=True):
        assert token in entry and 2 <= len(entry) <= 3
        assert {lp.rank for lp in entry.values()} >= {1, 2}  # the top 2, whatever was sampled
        assert all(lp.decoded_token is not None for lp in entry.values())
    total = sum(entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids, strict=True))
    assert completion.cumulative_logprob == pytest.approx(total)


def test_stop_strings_and_stop_tokens(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = llm.generate("stop here", greedy)[0].outputs[0]
    cut_at = len(reference.text) // 2
    stop = reference.text[cut_at : cut_at + 2]
    assert stop.strip(), "the generated text is too short for this test"
    stopped = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    completion = stopped[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == reference.text[: reference.text.index(stop)]

    token = reference.token_ids[3]
    by_token = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[token]))[0]
    first = reference.token_ids.index(token)
    assert by_token.outputs[0].token_ids == reference.token_ids[: first + 1]
    assert by_token.outputs[0].stop_reason == token


def test_chat_uses_template(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = llm.chat(messages, greedy)[0]
    assert chat.prompt == "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: "
    plain = llm.generate(chat.prompt, greedy)[0]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "Yo"}]], greedy)
    assert len(two) == 2


def test_chat_passes_tools_and_template_kwargs(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    tools = [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}]
    out = llm.chat(
        [{"role": "user", "content": "Time?"}], greedy, tools=tools, chat_template_kwargs={"enable_thinking": False}
    )
    assert out[0].prompt is not None
    assert '<tool_list>\n{"type": "function", "function": {"name": "clock"' in out[0].prompt
    assert out[0].prompt.endswith("User: Time?\nAssistant: <think>\n\n</think>\n\n")


def test_generation_config_defaults_apply(llm: LLM) -> None:
    # the tiny checkpoint's generation_config.json has no temperature: unset means 1.0 (sampling)
    assert llm.engine.generation_defaults == {}

    demo = LLM(model="demo")
    assert demo.engine.generation_defaults == {"temperature": 0.8, "top_p": 0.8}
    assert demo.engine.tokenizer.vocab_size <= demo.engine.model_config.vocab_size


def test_too_long_request_is_rejected(llm: LLM) -> None:
    limit = llm.engine.max_model_len
    with pytest.raises(SamplingParamsError, match=f"maximum context length is {limit}"):
        llm.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=limit))
    assert not llm.engine.has_unfinished_requests()


def test_demo_and_dummy_preset(tmp_path) -> None:
    outputs = LLM().generate("hello", SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    assert len(outputs[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="--load-format dummy"):
        LLM(model="ernie-4.5-0.3b")
