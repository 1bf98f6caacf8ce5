"""Sampler: greedy, seeded and temperature sampling, top-k/top-p/min-p, penalties, min_tokens and logprobs."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from ernie_serve.core.request import Request
from ernie_serve.core.sampler import Sampler
from ernie_serve.core.sampling_params import SamplingParams

EOS = 3


def make_request(
    prompt: list[int] | None = None, output: list[int] | None = None, request_id: str = "r", **params
) -> Request:
    request = Request(request_id, list(prompt or [0]), SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    request.output_token_ids = list(output or [])
    return request


def sample(sampler: Sampler, logits: list[list[float]] | torch.Tensor, requests: list[Request]) -> list[int]:
    states = [sampler.new_state(r.sampling_params.seed) for r in requests]
    return [t.token_id for t in sampler(torch.as_tensor(logits, dtype=torch.float32), requests, states)]


def greedy_pick(logits: list[float], **params) -> int:
    return sample(Sampler(), [logits], [make_request(temperature=0.0, **params)])[0]


def frequencies(logits: list[float], draws: int = 2000, seed: int = 0, **params) -> list[float]:
    """Empirical distribution of `draws` samples (one batch of identical unseeded requests)."""
    sampler = Sampler(seed)
    requests = [make_request(request_id=str(i), **params) for i in range(draws)]
    tokens = sample(sampler, torch.tensor(logits).repeat(draws, 1), requests)
    counts = Counter(tokens)
    return [counts[t] / draws for t in range(len(logits))]


LOGITS_4 = [1.0, 2.0, 0.5, -1.0]


# ----- greedy, seeds, temperature -----


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    requests = [make_request(request_id=str(i), temperature=0.0) for i in range(16)]
    assert sample(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_greedy_takes_the_first_of_equal_maxima_and_a_row_of_negative_infinity_gives_token_0() -> None:
    """As torch's argmax does (the CPU sampler picks with numpy's, which is 20x faster on a 32,000-token row):
    ties go to the lowest id, and a row with no finite logit still names a token."""
    ties = torch.tensor([[0.5, 2.0, -1.0, 2.0, 2.0], [float("-inf")] * 5, [1.0, 1.0, 1.0, 1.0, 3.0]])
    strided = torch.randn(5, 6, generator=torch.Generator().manual_seed(4)).t()  # [6, 5], not contiguous
    for logits in (ties, strided, ties.to(torch.bfloat16)):
        requests = [make_request(request_id=str(i), temperature=0.0) for i in range(logits.shape[0])]
        assert sample(Sampler(), logits, requests) == logits.float().argmax(dim=-1).tolist()
    assert sample(Sampler(), ties, [make_request(request_id=str(i), temperature=0.0) for i in range(3)]) == [1, 0, 4]


def test_greedy_rows_ignore_the_sampling_filters() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    requests = [make_request(request_id=str(i), temperature=0.0, top_p=0.5, top_k=3, seed=i) for i in range(4)]
    assert sample(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def _seeded_run(seed: int, companions: list[Request], steps: int = 60) -> list[int]:
    """Tokens of one seeded request over `steps` steps, sampled in a batch after `companions`."""
    sampler = Sampler(seed=99)
    target = make_request(request_id="target", temperature=1.0, seed=seed)
    batch = companions + [target]
    states = [sampler.new_state(r.sampling_params.seed) for r in batch]
    rows = torch.Generator().manual_seed(5)
    other_rows = torch.Generator().manual_seed(len(companions))
    tokens = []
    for _ in range(steps):
        target_logits = torch.randn(1, 20, generator=rows)
        logits = torch.cat([torch.randn(len(companions), 20, generator=other_rows), target_logits])
        out = sampler(logits, batch, states)
        tokens.append(out[-1].token_id)
    return tokens


def test_a_seeded_request_samples_the_same_tokens_whatever_the_batch() -> None:
    alone = _seeded_run(1234, [])
    companions = [
        make_request(request_id="unseeded", temperature=1.0),
        make_request(request_id="other-seed", temperature=0.7, seed=7),
        make_request(request_id="greedy", temperature=0.0),
        make_request(request_id="filtered", temperature=1.3, top_k=5, top_p=0.9),
    ]
    assert _seeded_run(1234, companions) == alone
    assert _seeded_run(1234, companions[::-1]) == alone
    assert len(set(alone)) > 5  # it really samples


def test_different_seeds_give_different_tokens() -> None:
    assert _seeded_run(1, []) != _seeded_run(2, [])


def test_unseeded_requests_share_the_engine_generator() -> None:
    logits = torch.zeros(1, 1000)
    first = [sample(Sampler(seed=3), logits, [make_request(temperature=1.0)])[0] for _ in range(2)]
    assert first[0] == first[1]  # the same engine seed starts the same stream
    sampler = Sampler(seed=3)
    state = sampler.new_state(None)
    request = make_request(temperature=1.0)
    draws = [sampler(logits, [request], [state])[0].token_id for _ in range(5)]
    assert len(set(draws)) > 1  # and the stream advances


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    return torch.softmax(torch.tensor(logits) / temperature, dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_the_softmax(temperature: float) -> None:
    freqs = frequencies(LOGITS_4, temperature=temperature)
    expected = _softmax(LOGITS_4, temperature)
    for f, p in zip(freqs, expected, strict=True):
        assert f == pytest.approx(p, abs=0.035)


# ----- top-k, top-p, min-p -----


def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(3))
    requests = [make_request(request_id=str(i), temperature=1.5, top_k=1) for i in range(32)]
    assert sample(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_the_k_most_likely_tokens() -> None:
    freqs = frequencies(LOGITS_4, temperature=1.0, top_k=2)
    assert freqs[2] == freqs[3] == 0.0
    p = _softmax(LOGITS_4[:2])
    assert freqs[0] == pytest.approx(p[0], abs=0.035)
    assert freqs[1] == pytest.approx(p[1], abs=0.035)


def test_a_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(4))
    requests = [make_request(request_id=str(i), temperature=1.0, top_p=1e-6) for i in range(32)]
    assert sample(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    freqs = frequencies(logits, temperature=1.0, top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: keep two
    assert freqs[2] == freqs[3] == 0.0
    assert freqs[0] == pytest.approx(0.5 / 0.8, abs=0.035)
    freqs = frequencies(logits, temperature=1.0, top_p=0.85)  # three
    assert freqs[2] > 0.1 and freqs[3] == 0.0


def test_min_p_drops_tokens_below_min_p_times_the_top_probability() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    freqs = frequencies(logits, temperature=1.0, min_p=0.2)  # threshold 0.1: only the 0.05 token goes
    assert freqs[3] == 0.0
    for f, p in zip(freqs[:3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], strict=True):
        assert f == pytest.approx(p, abs=0.035)
    freqs = frequencies(logits, temperature=1.0, min_p=0.5)  # threshold 0.25
    assert freqs[2] == freqs[3] == 0.0


@pytest.mark.parametrize(
    "params",
    [dict(top_p=1.0), dict(top_k=0), dict(top_k=-1), dict(top_k=0, top_p=1.0, min_p=0.0)],
    ids=["top_p=1", "top_k=0", "top_k=-1", "all-off"],
)
def test_disabled_filters_do_not_filter(params: dict) -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(6))
    plain = make_request(temperature=1.0, seed=11)
    filtered = make_request(temperature=1.0, seed=11, **params)
    sampler = Sampler()
    plain_state, filtered_state = sampler.new_state(11), sampler.new_state(11)
    for _ in range(100):
        a = sampler(logits, [plain], [plain_state])[0].token_id
        b = sampler(logits, [filtered], [filtered_state])[0].token_id
        assert a == b
    freqs = frequencies(LOGITS_4, temperature=1.0, **params)
    for f, p in zip(freqs, _softmax(LOGITS_4), strict=True):
        assert f == pytest.approx(p, abs=0.035)
    assert freqs[3] > 0  # the least likely token (p ~ 0.03) still comes up


# ----- penalties (verified through greedy picks on crafted logits) -----


def test_presence_and_frequency_penalties_subtract_over_output_tokens() -> None:
    logits = [1.0, 1.25, 0.0, -5.0, 0.0]
    assert greedy_pick(logits) == 1
    # 1.25 - 2 * 0.1 - 0.04 = 1.01 > 1.0; 1.25 - 0.2 - 0.06 = 0.99 < 1.0
    assert greedy_pick(logits, output=[1, 1], frequency_penalty=0.1, presence_penalty=0.04) == 1
    assert greedy_pick(logits, output=[1, 1], frequency_penalty=0.1, presence_penalty=0.06) == 0
    # frequency scales with the count, presence does not
    assert greedy_pick(logits, output=[1], frequency_penalty=0.2) == 1
    assert greedy_pick(logits, output=[1, 1], frequency_penalty=0.2) == 0
    assert greedy_pick(logits, output=[1, 1, 1, 1], presence_penalty=0.2) == 1
    # the prompt does not count
    assert greedy_pick(logits, prompt=[1, 1, 1], frequency_penalty=2.0, presence_penalty=2.0) == 1
    # a negative penalty encourages repeats
    assert greedy_pick([1.0, 0.9, 0.0, -5.0, 0.0], output=[1], presence_penalty=-0.2) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    positive = [1.5, 2.0, 0.0, -5.0, 0.0]
    assert greedy_pick(positive, prompt=[1], repetition_penalty=1.2) == 1  # 2.0 / 1.2 = 1.67 > 1.5
    assert greedy_pick(positive, prompt=[1], repetition_penalty=1.5) == 0  # 2.0 / 1.5 = 1.33 < 1.5
    assert greedy_pick(positive, prompt=[4], output=[1], repetition_penalty=1.5) == 0  # outputs count too
    assert greedy_pick(positive, prompt=[4], output=[2], repetition_penalty=1.5) == 1  # others untouched

    negative = [-1.5, -1.0, -9.0, -9.0, -9.0]
    assert greedy_pick(negative, prompt=[1], repetition_penalty=1.2) == 1  # -1.0 * 1.2 = -1.2 > -1.5
    assert greedy_pick(negative, prompt=[1], repetition_penalty=2.0) == 0  # -2.0 < -1.5
    # a penalty below 1 rewards repeats
    assert greedy_pick([2.0, 1.5, 0.0, -5.0, 0.0], prompt=[1], repetition_penalty=0.7) == 1


def test_penalties_follow_each_requests_ids_across_steps() -> None:
    """Counts the sampler keeps between steps equal counts taken afresh from the ids, whatever joins, leaves or
    reorders the batch, and whatever a request gains while it is away (the sampler follows its ids)."""
    vocab, rng, rows = 40, random.Random(0), torch.Generator().manual_seed(8)
    penalties = [
        dict(repetition_penalty=1.6),
        dict(frequency_penalty=0.3),
        dict(presence_penalty=0.8),
        dict(repetition_penalty=0.7, frequency_penalty=-0.2, presence_penalty=0.5),
        dict(frequency_penalty=0.4, min_tokens=5, stop_token_ids=[7]),
    ]
    pool = [
        make_request([rng.randrange(vocab) for _ in range(8)], request_id=str(i), temperature=0.0, **params)
        for i, params in enumerate(penalties * 2)
    ]
    sampler = Sampler()
    states = {r.request_id: sampler.new_state(None) for r in pool}
    penalized_picks = 0
    for _ in range(40):
        batch = rng.sample(pool, rng.randint(1, len(pool)))  # any subset, in any order
        logits = torch.randn(len(batch), vocab, generator=rows) * 0.5
        picks = [t.token_id for t in sampler(logits, batch, [states[r.request_id] for r in batch])]
        assert picks == sample(Sampler(), logits, batch)  # fresh states count from the ids
        penalized_picks += sum(a != b for a, b in zip(picks, logits.argmax(dim=-1).tolist(), strict=True))
        for request, token in zip(batch, picks, strict=True):
            request.output_token_ids.append(token)
        for request in pool:
            if request not in batch and rng.random() < 0.3:
                request.output_token_ids.append(rng.randrange(vocab))
    assert penalized_picks > 40  # the penalties really steer the picks


def test_the_backends_logits_are_left_as_they_are() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(9))
    before = logits.clone()
    requests = [
        make_request([1, 2], request_id="a", temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0),
        make_request(request_id="b", temperature=1.0, min_tokens=2, stop_token_ids=[5]),
        make_request(request_id="c", temperature=0.5, top_p=0.5),
    ]
    sample(Sampler(), logits, requests)
    assert torch.equal(logits, before)


# ----- min_tokens -----


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = [0.0, 0.0, 0.0, 10.0, 9.0, 8.0]  # eos (3) first, then stop token 4
    params = dict(min_tokens=2, stop_token_ids=[4])
    assert greedy_pick(logits, output=[], **params) == 5
    assert greedy_pick(logits, output=[1], **params) == 5
    assert greedy_pick(logits, output=[1, 1], **params) == EOS
    # ignore_eos leaves eos alone, stop tokens stay masked
    assert greedy_pick(logits, output=[], ignore_eos=True, **params) == EOS
    # random sampling is masked the same way
    picks = sample(Sampler(), torch.tensor(logits).repeat(200, 1), [make_request(temperature=1.0, **params)] * 200)
    assert EOS not in picks and 4 not in picks


@pytest.mark.parametrize("bad", [-5000, -1, 6, 10**12])
def test_stop_and_eos_ids_outside_the_vocabulary_are_ignored(bad: int) -> None:
    """They end nothing: masking them must neither fail nor hit another token (-1 would index the last one)."""
    logits = [0.0, 0.0, 1.0, 3.0, 2.0, 9.0]  # vocabulary of 6; the last token is the most likely
    sampler = Sampler()
    requests = [
        Request(str(i), [0], SamplingParams(temperature=t, min_tokens=1, stop_token_ids=[bad, 4]), frozenset({3, bad}))
        for i, t in enumerate([0.0, 1.0])
    ]
    states = [sampler.new_state(None) for _ in requests]
    assert [t.token_id for t in sampler(torch.tensor([logits, logits]), requests, states)] == [5, 5]


# ----- logprobs -----


def _raw_logprobs(logits: list[float]) -> list[float]:
    return torch.log_softmax(torch.tensor(logits), dim=-1).tolist()


def test_no_logprobs_unless_asked() -> None:
    sampler = Sampler()
    request = make_request(temperature=0.0)
    (token,) = sampler(torch.tensor([LOGITS_4]), [request], [sampler.new_state(None)])
    assert token.logprobs is None


def test_logprobs_0_gives_the_sampled_token_with_its_raw_logprob_and_rank() -> None:
    logits = [3.0, 2.0, 1.0, 0.0]
    sampler = Sampler()
    # the repetition penalty makes greedy pick token 1, whose raw rank is 2
    request = make_request(prompt=[0], temperature=0.0, repetition_penalty=10.0, logprobs=0)
    (token,) = sampler(torch.tensor([logits]), [request], [sampler.new_state(None)])
    assert token.token_id == 1
    assert list(token.logprobs) == [1]
    assert token.logprobs[1].rank == 2
    assert token.logprobs[1].logprob == pytest.approx(_raw_logprobs(logits)[1], abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_logprobs_k_gives_the_top_k_plus_the_sampled_token(k: int) -> None:
    logits = [3.0, 2.0, 1.0, 0.5, -1.0, 0.0]
    raw = _raw_logprobs(logits)
    sampler = Sampler()
    # min_tokens masks stop tokens 0..2 (eos may come: ignore_eos): greedy picks token 3, raw rank 4
    request = make_request(temperature=0.0, logprobs=k, min_tokens=1, stop_token_ids=[0, 1, 2], ignore_eos=True)
    (token,) = sampler(torch.tensor([logits]), [request], [sampler.new_state(None)])
    assert token.token_id == 3
    entry = token.logprobs
    assert len(entry) == k + 1
    assert {t: lp.rank for t, lp in entry.items()} == {**{t: t + 1 for t in range(k)}, 3: 4}
    for token_id, lp in entry.items():
        assert lp.logprob == pytest.approx(raw[token_id], abs=1e-5)


def test_logprobs_k_includes_a_top_sampled_token_once() -> None:
    logits = [3.0, 2.0, 1.0, 0.5]
    raw = _raw_logprobs(logits)
    sampler = Sampler()
    request = make_request(temperature=0.0, logprobs=2)
    (token,) = sampler(torch.tensor([logits]), [request], [sampler.new_state(None)])
    assert token.token_id == 0
    assert {t: lp.rank for t, lp in token.logprobs.items()} == {0: 1, 1: 2}
    assert [token.logprobs[t].logprob for t in (0, 1)] == pytest.approx(raw[:2], abs=1e-5)


def test_logprobs_are_of_the_raw_logits_not_the_tempered_ones() -> None:
    logits = [2.0, 1.0, 0.0, -1.0]
    raw = _raw_logprobs(logits)
    sampler = Sampler(seed=1)
    requests = [
        make_request(request_id=str(i), temperature=0.3, presence_penalty=1.5, output=[0], logprobs=4)
        for i in range(50)
    ]
    states = [sampler.new_state(None) for _ in requests]
    for token in sampler(torch.tensor([logits] * 50), requests, states):
        assert token.logprobs[token.token_id].logprob == pytest.approx(raw[token.token_id], abs=1e-5)
        assert {t: lp.rank for t, lp in token.logprobs.items()} == {0: 1, 1: 2, 2: 3, 3: 4}
        assert math.fsum(math.exp(lp.logprob) for lp in token.logprobs.values()) == pytest.approx(1.0)


def test_logprobs_k_is_each_rows_own() -> None:
    logits = [3.0, 2.0, 1.0, 0.5, 0.0]
    sampler = Sampler()
    requests = [
        make_request([0], request_id="a", temperature=0.0, repetition_penalty=10.0, logprobs=1),  # samples 1
        make_request(request_id="b", temperature=0.0, logprobs=3),
        make_request(request_id="c", temperature=0.0),
        make_request(request_id="d", temperature=0.0, logprobs=0),
    ]
    tokens = sampler(torch.tensor([logits] * 4), requests, [sampler.new_state(None) for _ in requests])
    ranks = [None if t.logprobs is None else {i: lp.rank for i, lp in t.logprobs.items()} for t in tokens]
    assert ranks == [{1: 2, 0: 1}, {0: 1, 1: 2, 2: 3}, None, {0: 1}]


def test_logprobs_only_for_rows_that_ask() -> None:
    sampler = Sampler()
    requests = [
        make_request(request_id="a", temperature=0.0, logprobs=1),
        make_request(request_id="b", temperature=1.0),
    ]
    states = [sampler.new_state(None) for _ in requests]
    tokens = sampler(torch.tensor([LOGITS_4, LOGITS_4]), requests, states)
    assert tokens[0].logprobs is not None and tokens[1].logprobs is None
