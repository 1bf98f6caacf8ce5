"""`ernie-serve bench structured-output`: what schema-constrained decoding adds to an engine step.

The same batch of requests (default 16, random prompts) decodes twice per round on one engine, once free and once
constrained to a JSON schema, the two taking turns for `rounds` rounds so a machine shared with other work favours
neither. Each engine step is timed (`Engine.step`: schedule, model, sampling with the masks, accepting tokens,
detokenizing) while every request of the batch is decoding; the table gives the median step of each kind over
all rounds, and the ratio. The schema is long enough (an array of objects) that no request completes its JSON
before `output_len` tokens, so both kinds decode the same number of tokens in the same batch.

The step's own noise (the model's time) can hide a difference of a few percent, so the sampler is also timed
alone, on random logits of the model's vocabulary, with and without the batch's matchers: the difference is
the work constraints add to a step (masks filled by the grammar engine, applied, tokens accepted).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ernie_serve.bench.workload import bench_checkpoint, random_requests
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.request import Request
from ernie_serve.core.sampler import Sampler
from ernie_serve.core.sampling_params import SamplingParams, StructuredOutputsParams
from ernie_serve.engine import Engine
from ernie_serve.logging import progress

# A record of several typed fields repeated: strings, bounded integers, enums, booleans and nesting, as an
# extraction schema would have.
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "minLength": 3, "maxLength": 16},
        "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "kind", "score", "active"],
    "additionalProperties": False,
}
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "items": ITEM, "minItems": 12, "maxItems": 12},
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class StepTimes:
    """Median seconds of one decode step with the whole batch running, free and constrained."""

    free: float
    constrained: float
    steps: int  # decode steps timed per kind, over all rounds
    sampler_free: float  # the sampler alone on the same batch, random logits
    sampler_constrained: float

    @property
    def ratio(self) -> float:
        return self.constrained / self.free


def _decode_steps(engine: Engine, params: SamplingParams, prompts: list[list[int]]) -> tuple[list[float], list[str]]:
    """Add the batch, step the engine until it is idle, and return the seconds of each step in which every
    request of the batch was decoding (prefill steps, and steps after the first request ended, are left out),
    and the texts generated."""
    for prompt in prompts:
        engine.add_request(prompt, params)
    times, texts = [], []
    while engine.has_unfinished_requests():
        stats = engine.core.scheduler.stats()
        decoding = stats.num_running == len(prompts) and stats.num_waiting == 0
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        if decoding and not any(o.finished for o in outputs) and all(o.outputs[0].token_ids for o in outputs):
            times.append(elapsed)
        texts += [o.outputs[0].text for o in outputs if o.finished]
    return times, texts


def measure(
    num_requests: int = 16, output_len: int = 64, prompt_len: int = 32, rounds: int = 5, model: str | None = None
) -> StepTimes:
    settings = EngineSettings(model=model or str(bench_checkpoint()), max_num_seqs=max(num_requests, 1))
    engine = Engine(settings)
    try:
        vocab = min(1000, engine.tokenizer.vocab_size)  # random ids the tokenizer has (a tiny one has 512)
        workload = random_requests(num_requests, prompt_len, output_len, vocab_size=vocab, seed=0)
        prompts = [r.prompt_token_ids for r in workload]
        common = dict(temperature=1.0, seed=0, max_tokens=output_len, ignore_eos=True)
        free = SamplingParams(**common)
        constrained = SamplingParams(**common, structured_outputs=StructuredOutputsParams(json=BENCH_SCHEMA))
        for params in (free, constrained):  # warm-up: first-use costs (allocations, grammar compilation)
            _decode_steps(engine, params, prompts[:2])
        times: dict[str, list[float]] = {"free": [], "constrained": []}
        for _ in progress(range(rounds), "rounds", unit="round"):
            times["free"] += _decode_steps(engine, free, prompts)[0]
            steps, texts = _decode_steps(engine, constrained, prompts)
            times["constrained"] += steps
            # the constraint was on: every answer starts the schema's object (its properties in any order)
            if not all(text.startswith('{"') for text in texts):
                raise RuntimeError(f"a constrained request wrote no JSON of the schema: {texts}")
        alone = _sampler_steps(engine, num_requests, output_len, rounds)
    finally:
        engine.close()
    steps = min(len(t) for t in times.values())
    free, constrained = statistics.median(times["free"]), statistics.median(times["constrained"])
    return StepTimes(free, constrained, steps, *alone)


def _sampler_steps(engine: Engine, batch: int, steps: int, rounds: int) -> tuple[float, float]:
    """Median seconds of one sampler call on `[batch, V]` random logits, free and with one matcher of the bench
    schema per row (advanced by the tokens it allows), taking turns for `rounds` rounds."""
    grammar = engine.structured_outputs.compile(StructuredOutputsParams(json=BENCH_SCHEMA))
    vocab, noise = engine.model_config.vocab_size, torch.Generator().manual_seed(0)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for constrained in (False, True):
            sampler = Sampler(0)
            requests = [Request(str(i), [1], SamplingParams(temperature=1.0, seed=i)) for i in range(batch)]
            for request in requests:
                request.logits_processors = [grammar.new_matcher()] if constrained else []
            states = [sampler.new_state(r.sampling_params.seed) for r in requests]
            for _ in range(steps):
                logits = torch.randn(batch, vocab, generator=noise)  # [B, V]
                started = time.perf_counter()
                sampler(logits, requests, states)
                times[constrained].append(time.perf_counter() - started)
    return statistics.median(times[False]), statistics.median(times[True])


def main(num_requests: int = 16, output_len: int = 64, rounds: int = 5, model: str | None = None) -> int:
    result = measure(num_requests, output_len, rounds=rounds, model=model)
    print(f"{num_requests} concurrent requests, {output_len} output tokens each, {rounds} rounds")
    print(f"{'decode step':<26} {'median ms':>10}")
    print(f"{'free':<26} {result.free * 1e3:>10.2f}")
    print(f"{'JSON-schema constrained':<26} {result.constrained * 1e3:>10.2f}")
    print(f"{'constrained / free':<26} {result.ratio:>10.3f}")
    print(f"(steps timed per kind: {result.steps})")
    added = result.sampler_constrained - result.sampler_free
    print(f"{'sampler alone, free':<26} {result.sampler_free * 1e3:>10.2f}")
    print(f"{'sampler alone, constrained':<26} {result.sampler_constrained * 1e3:>10.2f}")
    print(f"constraints add {added * 1e3:.2f} ms to a step: {added / result.free:.1%} of the free step")
    return 0
