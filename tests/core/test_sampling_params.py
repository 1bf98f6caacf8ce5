"""SamplingParams: validation names the offending field; defaults fill only what the request left unset."""

from __future__ import annotations

import pytest

from ernie_serve.core.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(n=0), "n"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=""), "stop"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_out_of_range_values_name_the_param(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)
    assert str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(n=3, top_p=1.0, temperature=0.0, max_tokens=1, min_tokens=1),
        dict(top_p=1e-9, top_k=-1, min_p=1.0, max_tokens=None, min_tokens=100),
        dict(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5, logprobs=0),
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


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
    assert {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "logprobs"} <= set(names)
