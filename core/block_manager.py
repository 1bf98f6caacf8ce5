"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, a free list, and chained prefix caching.

Pure Python. The scheduler asks `can_allocate` before `allocate`; the backend only ever sees block ids.
A full block is cached under the exact key (its parent block's cache id, its tokens): a hit is an exact
prefix match, never a hash collision. Freed cached blocks stay findable until reused, least recently freed first.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from ernie_serve.core.request import Request

CacheKey = tuple[int | None, tuple[int, ...]]  # (parent block's cache id, the block's tokens)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    cache_id: int | None = None  # unique id of the cached content, set once the block is full and computed
    cache_key: CacheKey | None = None  # (parent block's cache_id, this block's tokens)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached


@dataclass
class _RequestBlocks:
    cache_ids: list[int] = field(default_factory=list)  # cache ids of the request's full computed blocks


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = reuse first). Cached ones keep their hash until reused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[CacheKey, int] = {}  # exact content key -> block id
        self._cache_ids = itertools.count()  # never reused, so a stale parent id can match nothing
        self._per_request: dict[str, _RequestBlocks] = {}
        self.stats = PrefixCacheStats()

    # ----- queries -----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prefix cache lookup -----
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of the request's tokens. At least one token is always left
        to compute, because the step that computes it must produce the logits for sampling."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hit: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            block_id = self._cached.get((parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
            if block_id is None:
                break
            hit.append(block_id)
            parent = self.blocks[block_id].cache_id
        return hit

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry while it waits for room)."""
        if self.enable_prefix_caching:
            self.stats.queries += request.num_prompt_tokens
            self.stats.hits += min(num_hit_tokens, request.num_prompt_tokens)

    # ----- allocation -----
    def can_allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Whether `allocate(request, num_new_tokens, cached_block_ids)` would succeed."""
        held = len(request.block_ids) + len(cached_block_ids)
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - held
        # cached blocks that sit on the free list are taken from it, not added to it
        reclaimed = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return needed <= len(self._free) - reclaimed

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> None:
        """Give the request blocks for its first `num_computed_tokens + num_new_tokens` tokens, first taking
        references on `cached_block_ids` (a prefix hit from `find_cached_prefix`, on first schedule only)."""
        assert self.can_allocate(request, num_new_tokens, cached_block_ids), "allocate without can_allocate"
        state = self._per_request.setdefault(request.request_id, _RequestBlocks())
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
            assert block.cache_id is not None
            state.cache_ids.append(block.cache_id)
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"block {block_id} on the free list is referenced"
            if block.cache_key is not None:  # evict the cached prefix it held
                if self._cached.get(block.cache_key) == block_id:
                    del self._cached[block.cache_key]
                block.cache_id, block.cache_key = None, None
            block.ref_count = 1
            request.block_ids.append(block_id)

    def cache_computed_blocks(self, request: Request) -> None:
        """Called after a step advanced `num_computed_tokens`: cache blocks that became full so later requests
        with the same prefix can share them."""
        if not self.enable_prefix_caching:
            return
        state = self._per_request.setdefault(request.request_id, _RequestBlocks())
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= len(state.cache_ids):
            return
        parent = state.cache_ids[-1] if state.cache_ids else None
        for i in range(len(state.cache_ids), num_full):
            key = (parent, tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size)))
            canonical = self._cached.get(key)
            if canonical is None:
                block = self.blocks[request.block_ids[i]]
                assert block.cache_id is None, f"block {block.block_id} cached twice"
                block.cache_id, block.cache_key = next(self._cache_ids), key
                self._cached[key] = block.block_id
                canonical = block.block_id
            # an identical block computed concurrently by another request stays the canonical one
            parent = self.blocks[canonical].cache_id
            assert parent is not None
            state.cache_ids.append(parent)

    def free(self, request: Request) -> None:
        """Drop the request's references (finished, aborted or preempted). Its tail blocks go to the front of
        the eviction order, so shared prefixes, freed last, are kept longest."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.cache_id is None:
                    self._free.move_to_end(block_id, last=False)  # nothing cached: reuse first
        request.block_ids = []
        self._per_request.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix and restore block order, as on a fresh pool; False, changing nothing, while a
        request holds a block. The lookup counters (`stats`) keep counting."""
        if len(self._free) < self.num_blocks:  # the free list holds exactly the unreferenced blocks
            return False
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._cached.clear()
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        return True

    def check_invariants(self, live_requests: list[Request]) -> None:
        """Every block is either free or referenced exactly as often as live requests hold it."""
        counts = [0] * self.num_blocks
        for request in live_requests:
            for block_id in request.block_ids:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id} ref count is wrong"
            assert (block.block_id in self._free) == (block.ref_count == 0), f"block {block.block_id} misfiled"
        for key, block_id in self._cached.items():
            assert self.blocks[block_id].cache_key == key, "stale prefix cache entry"
