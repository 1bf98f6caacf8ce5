"""Sampler: per-sequence constraints (`LogitsProcessor`): the token bitmask applied to the logits, and the tokens
the processors are told; rows without one are left exactly as they were."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.core.request import Request
from ernie_serve.core.sampler import LogitsProcessor, Sampler
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.structured_output import allow_only


class Allow(LogitsProcessor):
    """Allows `allowed` (None: constrains nothing) and records what it is told."""

    def __init__(self, allowed: set[int] | None, finish_after: int | None = None) -> None:
        self.allowed = allowed
        self.finish_after = finish_after
        self.accepted: list[int] = []
        self.rows: list[torch.Tensor] = []

    def fill_bitmask(self, bitmask: torch.Tensor) -> bool:
        self.rows.append(bitmask.clone())
        if self.allowed is None:
            return False
        allow_only(bitmask, self.allowed)
        return True

    def accept_token(self, token_id: int) -> None:
        self.accepted.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.finish_after is not None and len(self.accepted) >= self.finish_after


def request(rid: str, *processors: LogitsProcessor, **params) -> Request:
    r = Request(rid, [0], SamplingParams(**params), eos_token_ids=frozenset({3}))
    r.logits_processors = list(processors)
    return r


def sample(logits: torch.Tensor, requests: list[Request], seed: int = 0) -> list[int]:
    sampler = Sampler(seed)
    states = [sampler.new_state(r.sampling_params.seed) for r in requests]
    return [t.token_id for t in sampler(logits, requests, states)]


def unpack(bitmask: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if int(bitmask[t // 32]) >> (t % 32) & 1}


@pytest.mark.parametrize("allowed", [{5}, {0, 31}, {31, 32, 63, 64}, {99}, set(range(0, 100, 7))])
def test_allow_only_sets_exactly_the_given_bits(allowed: set[int]) -> None:
    row = torch.full((4,), -1, dtype=torch.int32)  # 128 tokens
    allow_only(row, allowed)
    assert unpack(row, 128) == allowed


def test_greedy_picks_the_best_allowed_token() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0, 0.5, 2.0, 3.0, 8.0]])
    assert sample(logits, [request("r", temperature=0.0)]) == [1]
    assert sample(logits, [request("r", Allow({2, 4, 5}), temperature=0.0)]) == [5]


def test_random_rows_sample_only_allowed_tokens() -> None:
    vocab = 70  # not a multiple of 32: the last word is partly beyond the vocabulary
    allowed = {3, 33, 69}
    logits = torch.zeros(64, vocab)
    requests = [request(str(i), Allow(allowed), temperature=1.0, seed=i) for i in range(64)]
    tokens = sample(logits, requests)
    assert set(tokens) <= allowed and len(set(tokens)) > 1


@pytest.mark.parametrize("vocab", [31, 32, 33, 100])
def test_each_processor_gets_a_full_row_for_the_vocabulary(vocab: int) -> None:
    processor = Allow(None)
    sample(torch.zeros(1, vocab), [request("r", processor, temperature=0.0)])
    (row,) = processor.rows
    assert row.dtype == torch.int32 and row.shape == (-(-vocab // 32),)
    assert unpack(row, vocab) == set(range(vocab))


def test_rows_without_constraints_are_unchanged() -> None:
    """Greedy, seeded and unseeded rows sample what they sampled without a constrained row beside them."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))

    def batch(constrained: bool) -> list[Request]:
        return [
            request("greedy", temperature=0.0),
            request("seeded", temperature=1.0, seed=7),
            request("shared", temperature=0.7, top_p=0.9),
            request("c", *([Allow({11, 12})] if constrained else []), temperature=1.0, seed=3),
            request("c2", *([Allow({250})] if constrained else []), temperature=0.0),
        ]

    plain, constrained = sample(logits, batch(False)), sample(logits, batch(True))
    assert constrained[:3] == plain[:3]
    assert constrained[3] in {11, 12} and constrained[4] == 250
    assert plain[3] not in {11, 12} and plain[4] != 250  # the constraints did change something


def test_the_backends_logits_and_the_logprobs_stay_raw() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    before = logits.clone()
    sampler = Sampler()
    r = request("r", Allow({0}), temperature=0.0, logprobs=1)
    (token,) = sampler(logits, [r], [sampler.new_state(None)])
    assert token.token_id == 0
    assert torch.equal(logits, before)
    assert token.logprobs is not None and token.logprobs[3].rank == 1  # the raw distribution's top token


def test_a_request_s_processors_are_and_ed_and_all_told_every_token() -> None:
    first, second, idle = Allow({1, 2, 3}), Allow({2, 3, 4}), Allow(None)
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 6.0]])
    assert sample(logits, [request("r", first, second, idle, temperature=0.0)]) == [3]
    assert first.accepted == second.accepted == idle.accepted == [3]


def test_a_processor_that_constrains_nothing_leaves_its_row_alone() -> None:
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(4))
    idle = Allow(None)
    tokens = sample(logits, [request("a", idle, temperature=0.0), request("b", temperature=0.0)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert idle.accepted == [tokens[0]]
