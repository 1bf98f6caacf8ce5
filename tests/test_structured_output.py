"""Structured output through the offline API on the demo model (random weights): JSON that validates against its
schema, regexes, choices and lark grammars, `n` sequences and preemption, the compiled-grammar cache, specs that
do not compile, and plain `SamplingParams.logits_processors`."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from ernie_serve import LLM, SamplingParams, StructuredOutputsParams
from ernie_serve.core.plugins import UnknownPluginError
from ernie_serve.core.sampler import LogitsProcessor
from ernie_serve.core.sampling_params import SamplingParamsError
from ernie_serve.structured_output import GrammarCompileError, allow_only

# Every string, number and array is bounded, so even random weights reach the end within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "人物", "{"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="demo")


def constrained(**spec) -> dict:
    return {"structured_outputs": StructuredOutputsParams(**spec), "max_tokens": 200}


def test_json_schema_output_validates(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, **constrained(json=SCHEMA))
    sampled = SamplingParams(temperature=1.0, seed=3, n=3, **constrained(json=json.dumps(SCHEMA)))
    outputs = llm.generate(PROMPTS, greedy) + llm.generate(PROMPTS, sampled)
    completions = [c for o in outputs for c in o.outputs]
    assert len(completions) == 3 + 9
    for c in completions:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in completions}) > 3  # the sampled ones differ: each sequence has its own matcher


def test_json_object_output_parses(llm: LLM) -> None:
    """Any JSON object: strings and numbers are unbounded, so random weights end one only by chance (greedy ones
    never: they repeat a token inside a string). These seeds end theirs within max_tokens; what json_object
    promises, a parseable object, is what is checked."""
    params = [SamplingParams(temperature=0.8, seed=seed, **constrained(json_object=True)) for seed in (0, 2, 3)]
    outputs = llm.generate([PROMPTS[0], PROMPTS[0], "Answer in JSON"], params)
    for c in (o.outputs[0] for o in outputs):
        assert c.finish_reason == "stop", c.text
        parsed = json.loads(c.text)
        assert isinstance(parsed, dict) and parsed, c.text


def test_regex_choice_and_grammar(llm: LLM) -> None:
    grammar = 'start: ("yes" | "no") " " NUMBER\nNUMBER: /[0-9]{1,3}/'
    params = [
        SamplingParams(temperature=1.0, seed=1, **constrained(regex=r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)")),
        SamplingParams(temperature=1.0, seed=2, **constrained(choice=["alpha", "beta gamma", "δ"])),
        SamplingParams(temperature=0, ignore_eos=True, **constrained(choice=["yes", "no"])),
        SamplingParams(temperature=1.0, seed=4, **constrained(grammar=grammar)),
    ]
    regex, choice, yes_no, lark = (o.outputs[0] for o in llm.generate(["a", "b", "c", "d"], params))
    assert re.fullmatch(r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)", regex.text), regex.text
    assert choice.text in ["alpha", "beta gamma", "δ"]
    # ignore_eos cannot run past a grammar that has ended: the sequence stops with its last token
    assert yes_no.text in ["yes", "no"] and yes_no.finish_reason == "stop"
    assert re.fullmatch(r"(yes|no) [0-9]{1,3}", lark.text), lark.text
    assert all(c.finish_reason == "stop" for c in (regex, choice, lark))


def test_preempted_requests_keep_their_grammar_state() -> None:
    """A KV pool too small for all requests at once: they are preempted and recomputed mid-JSON, and still
    follow the schema."""
    with LLM(model="demo", block_size=4, num_gpu_blocks_override=40, max_model_len=160) as small:
        params = SamplingParams(temperature=1.0, seed=5, n=2, **{**constrained(json=SCHEMA), "max_tokens": 140})
        outputs = small.generate(PROMPTS, params)
    assert sum(o.metrics["num_preemptions"] for o in outputs) > 0
    for c in (c for o in outputs for c in o.outputs):
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_compiled_grammars_are_cached_per_spec(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = llm.engine.structured_outputs
    first = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    # the same schema as a dict with its keys in another order, or as text: one grammar
    assert compiler.compile(StructuredOutputsParams(json=dict(reversed(SCHEMA.items())))) is first
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA, sort_keys=True))) is first
    monkeypatch.setattr("ernie_serve.structured_output.GRAMMAR_CACHE_SIZE", 2)
    compiler.compile(StructuredOutputsParams(regex="a+"))
    compiler.compile(StructuredOutputsParams(regex="b+"))  # the schema is now the least recently used: evicted
    assert compiler.compile(StructuredOutputsParams(json=SCHEMA)) is not first


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": "objectx"}}, "objectx"),
        ({"json": "{not json"}, "structured_outputs.json cannot be compiled"),
        ({"regex": "([a-z"}, "structured_outputs.regex cannot be compiled"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ],
)
def test_a_spec_that_does_not_compile_is_refused_before_anything_runs(llm: LLM, spec: dict, message: str) -> None:
    params = [SamplingParams(max_tokens=4), SamplingParams(structured_outputs=StructuredOutputsParams(**spec))]
    with pytest.raises(GrammarCompileError, match=re.escape(message)) as info:
        llm.generate(["fine", "refused"], params)
    assert info.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "spec",
    [{}, {"json": SCHEMA, "regex": "a"}, {"choice": []}, {"choice": ["a", 3]}, {"regex": 5}, {"json_object": "yes"}],
)
def test_structured_outputs_params_need_exactly_one_kind(spec: dict) -> None:
    with pytest.raises(SamplingParamsError, match="structured_outputs") as info:
        SamplingParams(structured_outputs=spec)
    assert info.value.param == "structured_outputs"


def test_an_unknown_grammar_backend_is_named(tmp_path) -> None:
    with pytest.raises(
        UnknownPluginError, match="unknown grammar backend 'nope'; registered grammar backends: .*llguidance"
    ):
        LLM(model="demo", structured_outputs_backend="nope")


class ForceAfter(LogitsProcessor):
    """Forces `token` as the sequence's `after`-th token, then constrains nothing (a `</think>` budget's shape)."""

    def __init__(self, token: int, after: int) -> None:
        self.token, self.after, self.seen = token, after, 0

    def fill_bitmask(self, bitmask: torch.Tensor) -> bool:
        if self.seen != self.after:
            return False
        allow_only(bitmask, [self.token])
        return True

    def accept_token(self, token_id: int) -> None:
        self.seen += 1


def test_logits_processor_factories_make_one_processor_per_sequence(llm: LLM) -> None:
    made: list[ForceAfter] = []

    def factory() -> ForceAfter:
        made.append(ForceAfter(token=1234, after=3))
        return made[-1]

    params = SamplingParams(temperature=1.0, seed=9, n=3, max_tokens=6, ignore_eos=True, logits_processors=[factory])
    (output,) = llm.generate("forced", params)
    assert len(made) == 3 and all(p.seen == 6 for p in made)
    assert all(c.token_ids[3] == 1234 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
