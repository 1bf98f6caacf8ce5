"""SamplingParams: validation names the offending field; defaults fill only what the request left unset."""

from __future__ import annotations

from typing import Any

import pytest

from ernie_serve.core.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        (dict(n=0), "n", "n must be at least 1, got 0"),
        (dict(top_p=1.01), "top_p", "top_p must be in (0, 1], got 1.01"),
        (dict(top_p=0.0), "top_p", "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=-0.5), "top_p", "top_p must be in (0, 1], got -0.5"),
        (dict(temperature=-0.1), "temperature", "temperature must be >= 0, got -0.1"),
        (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1, got 0"),
        (dict(max_tokens=-3), "max_tokens", "max_tokens must be at least 1, got -3"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens", "min_tokens (5) must not exceed max_tokens (4)"),
        (dict(min_tokens=-1), "min_tokens", "min_tokens must be >= 0, got -1"),
        (dict(stop=[""]), "stop", "stop strings must not be empty"),
        (dict(stop=["ok", ""]), "stop", "stop strings must not be empty"),
        (dict(stop=""), "stop", "stop strings must not be empty"),
        (dict(top_k=-2), "top_k", "top_k must be -1 (disabled) or >= 0, got -2"),
        (dict(min_p=1.5), "min_p", "min_p must be in [0, 1], got 1.5"),
        (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty must be in [-2, 2], got 2.5"),
        (dict(frequency_penalty=-2.5), "frequency_penalty", "frequency_penalty must be in [-2, 2], got -2.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty", "repetition_penalty must be > 0, got 0.0"),
        (dict(logprobs=-1), "logprobs", "logprobs must be >= 0, got -1"),
    ],
)
def test_out_of_range_values_name_the_param(kwargs: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert (info.value.param, str(info.value)) == (param, message)


def test_callers_catching_value_error_catch_it() -> None:
    with pytest.raises(ValueError, match=r"^n must be at least 1, got 0$"):
        SamplingParams(n=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(n=3, top_p=1.0, temperature=0.0, max_tokens=1, min_tokens=1),
        dict(top_p=1e-9, top_k=-1, min_p=1.0, max_tokens=None, min_tokens=100),
        dict(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5, logprobs=0),
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    params = SamplingParams(**kwargs)
    assert {name: getattr(params, name) for name in kwargs} == kwargs  # kept as given, not clamped


def test_a_single_stop_string_becomes_a_list() -> None:
    params = SamplingParams(stop="END", stop_token_ids=None)
    assert params.stop == ["END"]
    assert params.stop_token_ids == []


def test_greedy_means_temperature_zero() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams().greedy


def test_with_defaults_fills_only_unset_temperature_and_top_p() -> None:
    unset = SamplingParams(max_tokens=7, seed=3)
    filled = unset.with_defaults(0.8, 0.9)
    assert (filled.temperature, filled.top_p) == (0.8, 0.9)
    assert (filled.max_tokens, filled.seed) == (7, 3)
    assert (unset.temperature, unset.top_p) == (None, None)  # a copy, the original untouched

    explicit = SamplingParams(temperature=0.0, top_p=0.5).with_defaults(0.8, 0.9)
    assert (explicit.temperature, explicit.top_p) == (0.0, 0.5)

    half = SamplingParams(top_p=0.3).with_defaults(0.8, 0.9)
    assert (half.temperature, half.top_p) == (0.8, 0.3)


def test_with_defaults_falls_back_to_one_without_a_generation_config() -> None:
    filled = SamplingParams().with_defaults(None, None)
    assert (filled.temperature, filled.top_p) == (1.0, 1.0)


def test_field_names_lists_every_option() -> None:
    names = SamplingParams.field_names()
    given = SamplingParams(n=2, temperature=0.5, top_p=0.9, top_k=5, seed=1, stop=["x"], max_tokens=3, logprobs=2)
    assert SamplingParams(**{name: getattr(given, name) for name in names}) == given  # enough to rebuild one
    assert len(set(names)) == len(names)
    assert {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "logprobs"} <= set(names)
