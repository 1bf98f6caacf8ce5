"""The KV gather/scatter plan of the TensorRT backend: pure index arithmetic and torch copies on the CPU."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.backends.onnx.graph import MASKED
from ernie_serve.backends.tensorrt.kv_plan import (
    DECODE_PROFILE,
    PAD_SLOT,
    PREFILL_PROFILE,
    ProfileLimits,
    Run,
    copy_bytes,
    gather_past,
    group_runs,
    run_inputs,
    scatter_new,
    slots_of,
)

PREFILL = ProfileLimits(max_batch=4, max_new=64, max_past=256)
DECODE = ProfileLimits(max_batch=3, max_new=1, max_past=256)


def test_slots_follow_the_block_table() -> None:
    # blocks of 4: positions 0-3 in block 7, 4-7 in block 2, 8.. in block 5
    assert slots_of([7, 2, 5], 0, 10, 4).tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21]
    assert slots_of([7, 2, 5], 6, 9, 4).tolist() == [10, 11, 20]


def test_run_inputs_for_a_prompt_chunk_and_a_decode() -> None:
    # sequence 0: 5 positions cached (blocks 7, 2), computes 3 more; sequence 1: 2 cached (block 4), computes 1
    inputs = run_inputs([[11, 12, 13], [21]], [5, 2], [[7, 2], [4]], block_size=4)
    assert (inputs.batch, inputs.new, inputs.past) == (2, 3, 5)
    assert inputs.input_ids.tolist() == [[11, 12, 13], [21, 0, 0]]
    assert inputs.position_ids.tolist() == [[5, 6, 7], [2, 3, 4]]
    assert inputs.logits_index.tolist() == [2, 0]
    # past slots, padded to P = 5 with PAD_SLOT
    assert inputs.gather_slots.view(2, 5).tolist() == [[28, 29, 30, 31, 8], [16, 17, PAD_SLOT, PAD_SLOT, PAD_SLOT]]
    # new rows: sequence 0's three (rows 0-2 of the flattened [B * S]), sequence 1's one (row 3)
    assert inputs.scatter_slots.tolist() == [9, 10, 11, 18]
    assert inputs.scatter_rows.tolist() == [0, 1, 2, 3]
    visible = inputs.attention_bias == 0  # [B, S, P + S]
    assert visible[0].int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    # sequence 1 sees its 2 cached keys and itself; its padding rows (logits never read) also see themselves,
    # so no row is fully masked
    assert visible[1].int().tolist() == [[1, 1, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1, 1, 1]]
    assert set(inputs.attention_bias.unique().tolist()) == {0.0, MASKED}


def test_a_run_of_fresh_prompts_binds_one_masked_past_position() -> None:
    inputs = run_inputs([[1, 2], [3, 4]], [0, 0], [[0], [1]], block_size=4)
    assert inputs.past == 1 and inputs.gather_slots.tolist() == [PAD_SLOT, PAD_SLOT]
    assert (inputs.attention_bias[:, :, 0] == MASKED).all()
    assert inputs.scatter_slots.tolist() == [0, 1, 4, 5]


def test_a_block_table_too_short_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold 9 positions"):
        run_inputs([[1, 2, 3, 4]], [5], [[0, 1]], block_size=4)


def _reference_cache(pool: torch.Tensor, table: list[int], length: int, block_size: int) -> torch.Tensor:
    """A sequence's keys/values [L, 2, K, length, D] read from the pool position by position."""
    rows = [pool[:, :, table[p // block_size] * block_size + p % block_size] for p in range(length)]  # [L, 2, K, D]
    return torch.stack(rows, dim=3)


def test_scatter_then_gather_returns_each_sequence_its_own_keys_and_values() -> None:
    """Two steps of two sequences sharing a pool (a prefix block shared as with prefix caching): what the engine
    returned as new rows comes back as the next run's past, in position order, for each sequence."""
    torch.manual_seed(0)
    layers, heads, dim, bs = 2, 3, 4, 4
    pool = torch.zeros(layers, 2, 10 * bs, heads, dim)  # [L, 2, slots, K, D]
    tables = [[3, 1], [6, 2]]
    step1 = run_inputs([[1] * 5, [2] * 3], [0, 0], tables, bs)
    new1 = torch.randn(layers, 2, 2, heads, step1.new, dim)  # [L, 2, B, K, S, D]
    scatter_new(pool, new1, step1)
    step2 = run_inputs([[9], [9]], [5, 3], tables, bs)
    past = gather_past(pool, step2)  # [L, 2, B, K, P, D]
    assert past.shape == (layers, 2, 2, heads, 5, dim) and past.is_contiguous()
    torch.testing.assert_close(past[:, :, 0], new1[:, :, 0, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(past[:, :, 1, :, :3], new1[:, :, 1, :, :3], rtol=0, atol=0)
    assert (past[:, :, 1, :, 3:] == 0).all()  # padding read the zeroed PAD_SLOT: finite, masked by the bias
    # padding rows of sequence 1 (rows 3, 4 of its S = 5) were dropped, not written anywhere
    written = (pool != 0).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()
    assert written == sorted(slots_of(tables[0], 0, 5, bs).tolist() + slots_of(tables[1], 0, 3, bs).tolist())
    for b, length in ((0, 5), (1, 3)):
        torch.testing.assert_close(_reference_cache(pool, tables[b], length, bs), new1[:, :, b, :, :length])


def test_gather_after_a_prefix_hit_reads_the_shared_blocks() -> None:
    """A new request whose first block is another's cached prefix (start_position 4 on its first step)."""
    bs = 4
    pool = torch.arange(8 * bs, dtype=torch.float32).view(1, 1, 8 * bs, 1, 1).expand(1, 2, 8 * bs, 1, 1).clone()
    inputs = run_inputs([[5, 6]], [4], [[3, 7]], bs)
    past = gather_past(pool, inputs)  # [1, 2, 1, 1, 4, 1]
    assert past.flatten().tolist() == [12.0, 13.0, 14.0, 15.0] * 2
    assert inputs.scatter_slots.tolist() == [28, 29]


def test_one_token_requests_share_decode_runs_and_prompts_batch_by_padding() -> None:
    counts = [1, 40, 1, 38, 1, 1, 8]
    runs = group_runs(counts, [9, 0, 3, 0, 50, 7, 4], PREFILL, DECODE)
    assert runs == [
        Run(DECODE_PROFILE, [0, 2, 4]),  # at most DECODE.max_batch = 3 each, in plan order
        Run(DECODE_PROFILE, [5]),
        Run(PREFILL_PROFILE, [1, 3]),  # 2 x 40 padded rows for 78 real: within MAX_PADDING
        Run(PREFILL_PROFILE, [6]),  # 3 x 40 rows for 86 real would not be
    ]
    assert sorted(i for run in runs for i in run.members) == list(range(len(counts)))


def test_prefill_runs_respect_the_profile_batch() -> None:
    runs = group_runs([4] * 6, [0] * 6, PREFILL, DECODE)
    assert [run.members for run in runs] == [[0, 1, 2, 3], [4, 5]]


def test_a_request_beyond_the_profiles_is_refused_with_the_limit() -> None:
    with pytest.raises(ValueError, match="at most 1 new tokens after 256"):
        group_runs([1], [300], PREFILL, DECODE)
    with pytest.raises(ValueError, match="at most 64 new tokens"):
        group_runs([65], [0], PREFILL, DECODE)


def test_copy_bytes_counts_padded_past_and_real_new_rows() -> None:
    # 21B-A3B in bf16: 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes = 56 KiB a token
    per_token = 2 * 28 * 4 * 128 * 2
    assert per_token == 57344
    gathered, scattered = copy_bytes(batch=64, past=8192, new_tokens=64, kv_bytes_per_token=per_token)
    assert gathered == 64 * 8192 * per_token and scattered == 64 * per_token
