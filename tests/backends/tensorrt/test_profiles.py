"""The TensorRT optimization profiles: every graph input covered, each of min/opt/max a consistent point, the
prefill max shape within the token budget, decode one token a sequence, and the profile chosen per run."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_serve.backends.onnx.graph import ATTENTION_BIAS, INPUT_IDS, LOGITS_INDEX, POSITION_IDS, past_names
from ernie_serve.backends.tensorrt.profiles import DECODE, PREFILL, profiles, select_profile
from ernie_serve.core.config import ModelConfig
from ernie_serve.models import PRESETS


def _config() -> ModelConfig:
    return PRESETS["ernie-4.5-21b-a3b"]


def _sizes(profile, point: int) -> tuple[int, int, int]:
    """(B, S, P) of one point (0 min, 1 opt, 2 max), read back from the shapes."""
    batch, seq, total = profile[ATTENTION_BIAS][point]
    return batch, seq, total - seq


def test_every_graph_input_has_shapes_of_its_rank() -> None:
    config = _config()
    names = {INPUT_IDS, POSITION_IDS, ATTENTION_BIAS, LOGITS_INDEX}
    names |= {name for layer in range(config.num_hidden_layers) for name in past_names(layer)}
    for profile in profiles(config, 8192, 256, 131072):
        assert set(profile) == names
        for name, shapes in profile.items():
            assert len(shapes) == 3
            assert len({len(shape) for shape in shapes}) == 1, name
        kv = profile[past_names(config.num_hidden_layers - 1)[1]]
        assert {(shape[1], shape[3]) for shape in kv} == {(config.num_key_value_heads, config.head_dim)}


def test_prefill_and_decode_ranges() -> None:
    prefill, decode = profiles(_config(), max_batch_tokens=8192, max_seqs=256, max_model_len=131072)
    assert [_sizes(prefill, p) for p in range(3)] == [(1, 1, 0), (1, 8192, 0), (1, 8192, 131071)]
    assert [_sizes(decode, p) for p in range(3)] == [(1, 1, 0), (256, 1, 65535), (256, 1, 131071)]


def test_prefill_batches_chunks_only_within_the_token_budget() -> None:
    """With sequences shorter than the budget, several whole ones fit a prefill run; B * S stays within it."""
    prefill, decode = profiles(_config(), max_batch_tokens=8192, max_seqs=3, max_model_len=2048)
    assert _sizes(prefill, 2) == (3, 2048, 2047)  # 4 would fit the budget, but only 3 sequences run at once
    prefill, _ = profiles(_config(), max_batch_tokens=8192, max_seqs=64, max_model_len=3000)
    assert _sizes(prefill, 2)[:2] == (2, 3000)
    _, decode = profiles(_config(), max_batch_tokens=16, max_seqs=64, max_model_len=3000)
    assert _sizes(decode, 2)[0] == 16  # one token each: the budget bounds decode's batch too


@settings(max_examples=200, deadline=None)
@given(
    max_batch_tokens=st.integers(1, 20_000),
    max_seqs=st.integers(1, 512),
    max_model_len=st.integers(1, 200_000),
)
def test_each_point_is_consistent_and_bounded(max_batch_tokens: int, max_seqs: int, max_model_len: int) -> None:
    config = _config()
    result = profiles(config, max_batch_tokens, max_seqs, max_model_len)
    for index, profile in enumerate(result):
        for point in range(3):
            batch, seq, past = _sizes(profile, point)
            assert profile[INPUT_IDS][point] == profile[POSITION_IDS][point] == (batch, seq)
            assert profile[LOGITS_INDEX][point] == (batch,)
            assert profile[past_names(0)[0]][point] == (batch, config.num_key_value_heads, past, config.head_dim)
            assert batch >= 1 and seq >= 1 and 0 <= past <= max_model_len - 1
            assert batch * seq <= max_batch_tokens, (index, point)
            assert batch <= max_seqs
        low, opt, high = (_sizes(profile, p) for p in range(3))
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
    assert {shape[1] for shape in result[DECODE][INPUT_IDS]} == {1}


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="max_seqs"):
        profiles(_config(), 8192, 0, 4096)
    with pytest.raises(ValueError, match="max_model_len"):
        profiles(_config(), 8192, 8, 0)


def test_select_profile_prefers_the_one_tuned_for_the_run() -> None:
    result = profiles(_config(), max_batch_tokens=512, max_seqs=32, max_model_len=4096)
    assert select_profile(result, batch=1, seq=1, past=100) == DECODE  # both hold it: decode is tuned for it
    assert select_profile(result, batch=32, seq=1, past=4095) == DECODE
    assert select_profile(result, batch=1, seq=300, past=0) == PREFILL
    assert select_profile(result, batch=2, seq=300, past=0) is None  # 600 rows: over the budget, split it
    assert select_profile(result, batch=33, seq=1, past=0) is None
    assert select_profile(result, batch=1, seq=1, past=4096) is None  # past the longest sequence
