"""KVBlockManager: allocation, reference counts, the free list and hash-chained prefix caching.

Tests drive it the way the scheduler does: `find_cached_prefix` -> `can_allocate` -> `allocate`, then
"compute" by advancing `num_computed_tokens` and calling `cache_computed_blocks`, then `free`.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_serve.core.block_manager import KVBlockManager
from ernie_serve.core.request import Request
from ernie_serve.core.sampling_params import SamplingParams

# Python hashes ints modulo 2**61 - 1 and maps -1 to -2, so these token pairs hash alike: the block
# manager must tell them apart by their tokens, not trust the hash.
COLLIDING_PAIRS = [(0, 2**61 - 1), (-1, -2), (1, 2**61)]


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, list(tokens), SamplingParams(temperature=0.0, max_tokens=8))


def admit(bm: KVBlockManager, request: Request, live: list[Request]) -> list[int]:
    """What the scheduler does on first schedule: look up the prefix cache, then allocate the rest."""
    cached = bm.find_cached_prefix(request)
    request.num_computed_tokens = len(cached) * bm.block_size
    num_new = request.num_tokens - request.num_computed_tokens
    assert bm.can_allocate(request, num_new, cached)
    bm.allocate(request, num_new, cached)
    live.append(request)
    bm.check_invariants(live)
    return cached


def compute(bm: KVBlockManager, request: Request, live: list[Request], upto: int | None = None) -> None:
    """The backend computed the request's tokens up to `upto` (default: all of them)."""
    request.num_computed_tokens = request.num_tokens if upto is None else upto
    bm.cache_computed_blocks(request)
    bm.check_invariants(live)


def release(bm: KVBlockManager, request: Request, live: list[Request]) -> None:
    bm.free(request)
    live.remove(request)
    bm.check_invariants(live)


def test_rejects_an_empty_pool() -> None:
    with pytest.raises(ValueError):
        KVBlockManager(0, 16)
    with pytest.raises(ValueError):
        KVBlockManager(4, 0)


def test_blocks_needed_rounds_up() -> None:
    bm = KVBlockManager(8, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_return_every_block() -> None:
    bm = KVBlockManager(8, 4)
    live: list[Request] = []
    request = make_request("a", list(range(10)))
    admit(bm, request, live)
    assert len(request.block_ids) == 3
    assert len(set(request.block_ids)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in request.block_ids)
    assert bm.usage == pytest.approx(3 / 8)

    release(bm, request, live)
    assert request.block_ids == []
    assert bm.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert bm.usage == 0.0


def test_allocate_grows_a_request_block_by_block() -> None:
    bm = KVBlockManager(8, 4, enable_prefix_caching=False)
    live: list[Request] = []
    request = make_request("a", list(range(6)))
    admit(bm, request, live)
    first_blocks = list(request.block_ids)
    assert len(first_blocks) == 2
    compute(bm, request, live)
    # decode: one new token each step; a block is added only when the last one is full
    for n in range(6, 13):
        request.output_token_ids.append(100 + n)
        assert bm.can_allocate(request, 1)
        bm.allocate(request, 1)
        bm.check_invariants(live)
        assert len(request.block_ids) == bm.blocks_needed(n + 1)
        assert request.block_ids[:2] == first_blocks  # earlier blocks never move
        compute(bm, request, live)
    assert bm.num_free_blocks == 8 - 4
    release(bm, request, live)
    assert bm.num_free_blocks == 8


@pytest.mark.parametrize("held_tokens", [0, 5, 12, 32])
def test_can_allocate_agrees_with_allocate(held_tokens: int) -> None:
    for num_new in range(0, 40):
        bm = KVBlockManager(8, 4, enable_prefix_caching=False)
        live: list[Request] = []
        if held_tokens:
            admit(bm, make_request("other", list(range(held_tokens))), live)
        request = make_request("r", list(range(1000, 1000 + max(num_new, 1))))
        free_before = bm.num_free_blocks
        fits = bm.blocks_needed(num_new) <= free_before
        assert bm.can_allocate(request, num_new) == fits
        if fits:
            bm.allocate(request, num_new)
            live.append(request)
            assert bm.num_free_blocks == free_before - bm.blocks_needed(num_new)
        else:
            with pytest.raises(AssertionError):
                bm.allocate(request, num_new)
            assert request.block_ids == []
            assert bm.num_free_blocks == free_before
        bm.check_invariants(live)


def test_can_allocate_counts_cached_blocks_taken_off_the_free_list() -> None:
    bm = KVBlockManager(4, 4)
    live: list[Request] = []
    prefix = list(range(12))
    first = make_request("first", prefix + [50])
    admit(bm, first, live)
    compute(bm, first, live)
    release(bm, first, live)
    assert bm.num_free_blocks == 4  # three of them still hold the cached prefix

    # 3 cached blocks + 2 new blocks: 4 free blocks, but the 3 cached ones are among them
    too_big = make_request("too-big", prefix + list(range(60, 65)))
    cached = bm.find_cached_prefix(too_big)
    assert len(cached) == 3
    too_big.num_computed_tokens = 12
    assert not bm.can_allocate(too_big, 5, cached)
    with pytest.raises(AssertionError):
        bm.allocate(too_big, 5, cached)

    fits = make_request("fits", prefix + list(range(60, 64)))
    cached = admit(bm, fits, live)
    assert len(cached) == 3
    assert bm.num_free_blocks == 0
    release(bm, fits, live)


def test_double_free_raises() -> None:
    bm = KVBlockManager(4, 4)
    live: list[Request] = []
    request = make_request("a", list(range(6)))
    admit(bm, request, live)
    block_ids = list(request.block_ids)
    release(bm, request, live)
    # a stale copy of the block table freed again must not put blocks on the free list twice
    request.block_ids = block_ids
    with pytest.raises(AssertionError, match="double free"):
        bm.free(request)
    assert bm.num_free_blocks == 4
    bm.check_invariants([])


def test_check_invariants_catches_a_wrong_block_table() -> None:
    bm = KVBlockManager(4, 4)
    request = make_request("a", list(range(6)))
    admit(bm, request, [])  # admit checks invariants with the request live
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # its blocks are referenced but no live request holds them
    request.block_ids.append(request.block_ids[0])
    with pytest.raises(AssertionError):
        bm.check_invariants([request])


def test_two_requests_with_a_long_common_prefix_share_full_blocks() -> None:
    bm = KVBlockManager(16, 4)
    live: list[Request] = []
    prefix = list(range(100, 112))  # three full blocks
    first = make_request("first", prefix + [1, 2])
    assert admit(bm, first, live) == []
    compute(bm, first, live)

    second = make_request("second", prefix + [7, 8, 9])
    cached = admit(bm, second, live)
    assert cached == first.block_ids[:3]
    assert second.block_ids[:3] == first.block_ids[:3]
    assert second.block_ids[3] != first.block_ids[3]
    assert second.num_computed_tokens == 12
    assert [bm.blocks[b].ref_count for b in second.block_ids] == [2, 2, 2, 1]
    assert bm.num_free_blocks == 16 - 5

    release(bm, first, live)
    assert [bm.blocks[b].ref_count for b in second.block_ids] == [1, 1, 1, 1]
    assert bm.num_free_blocks == 16 - 4
    release(bm, second, live)
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert bm.num_free_blocks == 16


def test_only_full_computed_blocks_are_cached() -> None:
    bm = KVBlockManager(16, 4)
    live: list[Request] = []
    tokens = list(range(14))  # blocks: 4 + 4 + 4 + 2
    first = make_request("first", tokens)
    admit(bm, first, live)
    # allocated but not computed: nothing to share yet
    assert bm.find_cached_prefix(make_request("probe", tokens + [99])) == []

    compute(bm, first, live, upto=6)  # one full block, half of the next
    assert bm.find_cached_prefix(make_request("probe", tokens + [99])) == first.block_ids[:1]

    compute(bm, first, live, upto=14)
    assert bm.find_cached_prefix(make_request("probe", tokens + [99])) == first.block_ids[:3]
    # the partial fourth block is never cached
    assert bm.blocks[first.block_ids[3]].cache_id is None


def test_prefix_caching_disabled_never_hits() -> None:
    bm = KVBlockManager(16, 4, enable_prefix_caching=False)
    live: list[Request] = []
    first = make_request("first", list(range(13)))
    admit(bm, first, live)
    compute(bm, first, live)
    assert all(block.cache_id is None for block in bm.blocks)
    assert bm.find_cached_prefix(make_request("again", list(range(13)))) == []


@pytest.mark.parametrize("block_size", [1, 4])
def test_the_last_prompt_token_is_never_a_cache_hit(block_size: int) -> None:
    bm = KVBlockManager(32, block_size)
    live: list[Request] = []
    tokens = list(range(12))  # a whole number of blocks for both sizes
    first = make_request("first", tokens)
    admit(bm, first, live)
    compute(bm, first, live)

    again = make_request("again", tokens)
    cached = admit(bm, again, live)
    assert len(cached) * block_size == 12 - block_size  # the last block is recomputed for its logits
    assert again.num_computed_tokens < again.num_tokens

    longer = make_request("longer", tokens + [77])
    assert len(admit(bm, longer, live)) * block_size == 12


def test_cached_blocks_survive_free_and_are_evicted_least_recently_freed_first() -> None:
    bm = KVBlockManager(6, 2)
    live: list[Request] = []
    a = make_request("a", [1, 2, 3, 4, 5])  # two full blocks + one partial
    b = make_request("b", [11, 12, 13, 14, 15])
    for request in (a, b):
        admit(bm, request, live)
        compute(bm, request, live)
    release(bm, a, live)
    release(bm, b, live)
    assert bm.num_free_blocks == 6
    assert bm.usage == 0.0

    def hits(tokens: list[int]) -> int:
        return len(bm.find_cached_prefix(make_request("probe", tokens)))

    assert hits([1, 2, 3, 4, 5]) == 2
    assert hits([11, 12, 13, 14, 15]) == 2

    # Partial (uncached) blocks go first, then a's blocks (freed before b's), tail block before head block.
    c = make_request("c", [31, 32, 33, 34, 35, 36])
    admit(bm, c, live)
    assert hits([1, 2, 3, 4, 5]) == 1
    assert hits([11, 12, 13, 14, 15]) == 2
    # a reused block forgets its old prefix and can cache the new one
    compute(bm, c, live)
    assert hits([31, 32, 33, 34, 35, 36, 37]) == 3
    d = make_request("d", [41, 42])
    admit(bm, d, live)
    assert hits([1, 2, 3, 4, 5]) == 0
    assert hits([11, 12, 13, 14, 15]) == 2
    e = make_request("e", [51])
    admit(bm, e, live)
    assert hits([11, 12, 13, 14, 15]) == 1
    assert bm.num_free_blocks == 1
    for request in (c, d, e):
        release(bm, request, live)


def test_a_cache_hit_takes_a_freed_block_off_the_free_list() -> None:
    bm = KVBlockManager(8, 4)
    live: list[Request] = []
    first = make_request("first", list(range(9)))
    admit(bm, first, live)
    compute(bm, first, live)
    release(bm, first, live)
    assert bm.num_free_blocks == 8

    second = make_request("second", list(range(9)))
    cached = admit(bm, second, live)
    assert len(cached) == 2
    assert bm.num_free_blocks == 8 - 3
    assert all(bm.blocks[b].ref_count == 1 for b in second.block_ids)
    release(bm, second, live)


def test_identical_blocks_computed_concurrently_keep_the_cache_consistent() -> None:
    bm = KVBlockManager(6, 2)
    live: list[Request] = []
    tokens = [1, 2, 3, 4, 5]
    a, b = make_request("a", tokens), make_request("b", tokens)
    admit(bm, a, live)
    admit(bm, b, live)  # admitted in the same step: nothing cached yet
    compute(bm, a, live)
    compute(bm, b, live)
    assert bm.find_cached_prefix(make_request("probe", tokens)) == a.block_ids[:2]
    release(bm, a, live)
    release(bm, b, live)
    # churn through the pool; every eviction must leave the cache pointing at the blocks that hold the tokens
    for i in range(6):
        filler = make_request(f"filler-{i}", [100 + i])
        admit(bm, filler, live)
        hit = bm.find_cached_prefix(make_request("probe", tokens))
        for index, block_id in enumerate(hit):
            assert bm.blocks[block_id].cache_key[1] == tuple(tokens[2 * index : 2 * index + 2])
    assert bm.num_free_blocks == 0


@pytest.mark.parametrize("x, y", COLLIDING_PAIRS)
def test_a_hash_collision_is_never_a_hit(x: int, y: int) -> None:
    assert hash((None, (x,))) == hash((None, (y,)))  # the premise: these keys collide in a dict
    bm = KVBlockManager(16, 1)
    live: list[Request] = []
    first = make_request("first", [x, 7, 5, x, 9])
    admit(bm, first, live)
    compute(bm, first, live)
    # colliding first block
    assert bm.find_cached_prefix(make_request("p1", [y, 7, 5, x, 9])) == []
    # equal first blocks, colliding fourth block: the hit stops before it
    assert bm.find_cached_prefix(make_request("p2", [x, 7, 5, y, 9])) == first.block_ids[:3]


@pytest.mark.parametrize("x, y", COLLIDING_PAIRS[:1])
def test_a_child_of_a_colliding_parent_is_never_a_hit(x: int, y: int) -> None:
    bm = KVBlockManager(16, 1)
    live: list[Request] = []
    for request in (make_request("s1", [x, 5]), make_request("s2", [y, 7])):
        admit(bm, request, live)
        compute(bm, request, live)
    s2_child = live[1].block_ids[1]  # KV of token 7 computed after y
    hit = bm.find_cached_prefix(make_request("probe", [x, 7, 9]))
    assert s2_child not in hit
    assert len(hit) == 1


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 3]),
    first=st.lists(st.sampled_from([0, 1, 2, 2**61 - 1, 2**61, -1, -2]), min_size=1, max_size=12),
    second=st.lists(st.sampled_from([0, 1, 2, 2**61 - 1, 2**61, -1, -2]), min_size=1, max_size=12),
)
def test_different_tokens_never_hit(block_size: int, first: list[int], second: list[int]) -> None:
    bm = KVBlockManager(32, block_size)
    live: list[Request] = []
    a = make_request("a", first)
    admit(bm, a, live)
    compute(bm, a, live)
    b = make_request("b", second)
    cached = admit(bm, b, live)
    num_hit = len(cached) * block_size
    # a hit covers exactly the longest common prefix of whole blocks, never the last token
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    expected_blocks = min(common // block_size, (len(second) - 1) // block_size, len(first) // block_size)
    assert len(cached) == expected_blocks
    assert num_hit < len(second)
    assert b.block_ids[: len(cached)] == a.block_ids[: len(cached)]
    release(bm, a, live)
    release(bm, b, live)
    assert bm.num_free_blocks == 32


def test_prefix_lookup_stats_count_prompt_tokens() -> None:
    bm = KVBlockManager(8, 4)
    live: list[Request] = []
    first = make_request("first", list(range(10)))
    admit(bm, first, live)
    bm.record_prefix_lookup(first, 0)
    compute(bm, first, live)
    second = make_request("second", list(range(10)))
    cached = admit(bm, second, live)
    bm.record_prefix_lookup(second, len(cached) * 4)
    assert (bm.stats.queries, bm.stats.hits) == (20, 8)


def test_usage_counts_blocks_held_by_live_requests() -> None:
    bm = KVBlockManager(10, 2)
    live: list[Request] = []
    assert bm.usage == 0.0
    a = make_request("a", [1, 2, 3])  # 2 blocks
    admit(bm, a, live)
    assert bm.usage == pytest.approx(0.2)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7])  # 4 blocks
    admit(bm, b, live)
    assert bm.usage == pytest.approx(0.6)
    release(bm, a, live)
    assert bm.usage == pytest.approx(0.4)
    release(bm, b, live)
    assert bm.usage == 0.0


def test_reset_prefix_cache_forgets_every_prefix_and_restores_block_order() -> None:
    """As on a fresh pool: nothing found, and a request gets blocks 0, 1, 2 ... again (so a benchmark round
    run again computes its prompts, in consecutive blocks, as the first did). Refused while a block is held."""
    bm = KVBlockManager(8, 2)
    live: list[Request] = []
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(bm, a, live)
    compute(bm, a, live)
    assert not bm.reset_prefix_cache()  # a holds its blocks
    assert len(bm.find_cached_prefix(make_request("probe", [1, 2, 3, 4, 5, 6, 7]))) == 3
    release(bm, a, live)
    again = make_request("again", [1, 2, 3, 4, 5, 6, 7])
    assert len(bm.find_cached_prefix(again)) == 3
    assert bm.reset_prefix_cache()
    assert bm.find_cached_prefix(again) == []
    assert bm.num_free_blocks == 8 and all(block.cache_id is None for block in bm.blocks)
    admit(bm, again, live)
    assert again.block_ids == [0, 1, 2, 3]
    compute(bm, again, live)  # and caches anew
    assert len(bm.find_cached_prefix(make_request("probe", [1, 2, 3, 4, 5, 6, 7]))) == 3
    assert bm.stats.queries == 0  # (admit here skips the scheduler's counting; the counters are not reset)
