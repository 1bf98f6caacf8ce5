"""Pinned outputs: the exact tokens the sampler produced before it moved onto the logits' device.

The ids below were recorded from the host-side sampler (commit 2053978) on CPU. Greedy picks and seeded samples
must not change when the sampler's implementation does; a change here is a change users see.
"""

from __future__ import annotations

import torch

from ernie_serve.core.request import Request
from ernie_serve.core.sampler import Sampler
from ernie_serve.core.sampling_params import SamplingParams

EOS = 3


def _requests(rows: list[dict], prompt: list[int]) -> list[Request]:
    return [
        Request(f"r{i}", list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}))
        for i, params in enumerate(rows)
    ]


def _run(rows: list[dict], vocab: int, steps: int, engine_seed: int) -> list[list[int]]:
    """Tokens per step, each appended to its request's outputs after the step as the scheduler does."""
    torch.manual_seed(0)
    logits = torch.randn(steps, len(rows), vocab) * 2  # [S, B, V]
    logits[..., :10] += 3.0  # favour a few tokens (eos and stop ids among them) so penalties and masks matter
    requests = _requests(rows, prompt=[5, 7, 7, 11, 2])
    sampler = Sampler(engine_seed)
    states = [sampler.new_state(r.sampling_params.seed) for r in requests]
    tokens = []
    for step in range(steps):
        out = [t.token_id for t in sampler(logits[step], requests, states)]
        for request, token in zip(requests, out, strict=True):
            request.output_token_ids.append(token)
        tokens.append(out)
    return tokens


MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.4, min_tokens=3, stop_token_ids=[0, 1, 2, 4]),
    dict(temperature=0.8, top_k=10, seed=1234),
    dict(temperature=1.2, top_p=0.6, frequency_penalty=1.5, presence_penalty=0.8, seed=7),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.7, repetition_penalty=1.2, min_tokens=4, stop_token_ids=[9, 17], seed=2**40 + 3),
    dict(temperature=0.9, top_p=0.8, presence_penalty=1.5),
]
MIXED_TOKENS = [
    [4, 9, 7, 36, 6, 0, 37],
    [43, 8, 2, 38, 3, 1, 7],
    [0, 5, 10, 1, 9, 35, 1],
    [9, 1, 45, 7, 4, 6, 6],
    [1, 22, 7, 0, 6, 47, 5],
    [30, 6, 14, 4, 2, 8, 29],
    [7, 8, 28, 9, 37, 4, 8],
    [0, 4, 9, 7, 28, 9, 3],
]

UNFILTERED = [
    dict(temperature=1.0, seed=5),
    dict(temperature=0.5),
    dict(temperature=1.5, seed=6, presence_penalty=2.0),
    dict(temperature=0.0, frequency_penalty=1.5),
    dict(temperature=1.0, frequency_penalty=1.0),
]
UNFILTERED_TOKENS = [
    [898, 472, 91, 8, 835],
    [871, 6, 584, 934, 656],
    [1, 755, 97, 401, 53],
    [429, 326, 880, 0, 280],
    [157, 770, 124, 264, 341],
    [787, 326, 585, 9, 664],
]


def test_mixed_batch_tokens_are_pinned() -> None:
    assert _run(MIXED, vocab=50, steps=8, engine_seed=0) == MIXED_TOKENS


def test_unfiltered_batch_tokens_are_pinned() -> None:
    """No row filters (plain softmax), with unseeded rows drawing from the engine's generator."""
    assert _run(UNFILTERED, vocab=1000, steps=6, engine_seed=42) == UNFILTERED_TOKENS
